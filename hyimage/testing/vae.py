"""Tiny VAE checkpoints in the release format (`config.json` + `pytorch_model.ckpt`/`.pt`, keys prefixed `vae.`).

The tiny configurations keep the real compression factors and latent channels (32x / 64 for the image VAE,
16x spatial, 4x temporal / 32 for the refiner's) with narrow channels and one resnet per level.
"""

import json
from pathlib import Path

import torch

from hyimage.models.vae.vae_2d import HunyuanVAE2D
from hyimage.models.vae.vae_3d import AutoencoderKLConv3D


def tiny_vae_2d_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 64,
        "block_out_channels": [32, 32, 64, 64, 128, 128],
        "layers_per_block": 1,
        "ffactor_spatial": 32,
        "sample_size": 128,
        "sample_tsize": 1,
        "scaling_factor": 0.75289,
        "shift_factor": None,
        "downsample_match_channel": True,
        "upsample_match_channel": True,
    }


def tiny_refiner_vae_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 32,
        "block_out_channels": [32, 32, 64, 64, 64],
        "layers_per_block": 1,
        "ffactor_spatial": 16,
        "ffactor_temporal": 4,
        "sample_size": 64,
        "sample_tsize": 8,
        "scaling_factor": 1.03682,
        "shift_factor": None,
        "downsample_match_channel": True,
        "upsample_match_channel": True,
    }


def random_vae_state_dict(model_cls: type, config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Default-initialised weights of `model_cls(**config)` with every tensor perturbed (norms included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        state = model_cls(**config).state_dict()
    return {key: value + 0.05 * torch.randn(value.shape, generator=generator) for key, value in state.items()}


def _write_release_dir(
    path: Path,
    config: dict,
    state_dict: dict[str, torch.Tensor],
    filename: str,
    wrap: bool,
    prefix: str,
    conv_5d: bool,
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    stored = {}
    for key, value in state_dict.items():
        if conv_5d and key.endswith("weight") and value.ndim == 4:
            value = value.unsqueeze(2)
        stored[prefix + key] = value.contiguous()
    torch.save({"state_dict": stored} if wrap else stored, path / filename)
    return path


def write_vae_2d_dir(
    path: str | Path,
    *,
    config: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    filename: str = "pytorch_model.ckpt",
    wrap: bool = True,
    prefix: str = "vae.",
    conv_5d: bool = False,
) -> Path:
    """A `vae/vae_2_1`-style folder; `conv_5d` stores conv weights as (O, I, 1, k, k) like diffusers' script."""
    config = config or tiny_vae_2d_config()
    state_dict = state_dict or random_vae_state_dict(HunyuanVAE2D, config, seed)
    return _write_release_dir(Path(path), config, state_dict, filename, wrap, prefix, conv_5d)


def write_refiner_vae_dir(
    path: str | Path,
    *,
    config: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    filename: str = "pytorch_model.pt",
    wrap: bool = True,
    prefix: str = "vae.",
) -> Path:
    """A `vae/vae_refiner`-style folder."""
    config = config or tiny_refiner_vae_config()
    state_dict = state_dict or random_vae_state_dict(AutoencoderKLConv3D, config, seed)
    return _write_release_dir(Path(path), config, state_dict, filename, wrap, prefix, conv_5d=False)
