"""Load the released VAE folders (`vae/vae_2_1`, `vae/vae_refiner`) and their diffusers conversions.

Release layout: `config.json` + `pytorch_model.ckpt` (or `.pt`), a torch checkpoint read with
`torch.load(weights_only=True, mmap=True)`, possibly wrapped in {"state_dict": ...}, keys prefixed `vae.`;
5-D conv weights with one frame (as diffusers' conversion script writes them) are squeezed for the 2D VAE.
Evidence: the official `load_vae` (hyimage/models/vae/__init__.py) unwraps "state_dict", keeps the `vae.` keys
with the prefix removed and loads strictly, its `HunyuanVAE2D.load_state_dict` squeezing 5-D one-frame weights;
diffusers' `load_original_vae_checkpoint` does the same. The official stack pins torch 2.6, whose `torch.load`
already defaults to `weights_only=True`, so the released files hold only tensors and plain containers.
Diffusers layout: `config.json` + `diffusion_pytorch_model.safetensors`, renamed through
`hyimage.loading.vae_diffusers_keys`. The model is built on `meta` and the tensors are assigned into it.
"""

import inspect
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import nn

from hyimage.errors import CheckpointError
from hyimage.loading.safetensors_header import regular_file_size
from hyimage.loading.safetensors_io import GetTensor, TensorSource, Translate, load_safetensors_into
from hyimage.loading.torch_io import read_torch_file, tensor_state_dict
from hyimage.loading.vae_diffusers_keys import (
    DIFFUSERS_CLASS_NAMES,
    config_from_diffusers,
    refiner_vae_key_map,
    vae_2d_key_map,
)
from hyimage.loading.verify import check_state_finite

CONFIG_FILE = "config.json"
RELEASE_FILES = ("pytorch_model.ckpt", "pytorch_model.pt")
DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
KEY_PREFIX = "vae."
RELEASE_FOLDERS = {"HunyuanVAE2D": "vae/vae_2_1", "AutoencoderKLConv3D": "vae/vae_refiner"}


def _redownload_hint(model_name: str) -> str:
    folder = RELEASE_FOLDERS.get(model_name, "vae/...")
    return f"fetch {folder} of tencent/HunyuanImage-2.1 again with `hyimage download --verify` (see ckpts/README.md)"


def read_vae_config(path: Path, model_cls: type) -> tuple[dict[str, Any], bool]:
    """The constructor keywords from `path` (official or diffusers config.json), and whether it is diffusers'."""
    name = model_cls.__name__
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"{path} does not exist; a VAE folder needs its config.json: {_redownload_hint(name)}")
    regular_file_size(path, "VAE config")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); {_redownload_hint(name)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object of VAE settings; {_redownload_hint(name)}")

    class_name = config.get("_class_name")
    is_diffusers = class_name in DIFFUSERS_CLASS_NAMES
    if is_diffusers:
        if DIFFUSERS_CLASS_NAMES[class_name] != name:
            raise CheckpointError(
                f"{path} describes a diffusers {class_name}, which is hyimage's {DIFFUSERS_CLASS_NAMES[class_name]}, "
                f"not {name}; load it with {DIFFUSERS_CLASS_NAMES[class_name]}.from_pretrained"
            )
        config = config_from_diffusers(config, name)
    elif class_name in RELEASE_FOLDERS and class_name != name:
        raise CheckpointError(
            f"{path} describes a {class_name}, not a {name}; load it with {class_name}.from_pretrained"
        )

    parameters = inspect.signature(model_cls.__init__).parameters.values()
    required = [p.name for p in parameters if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD][1:]
    missing = [key for key in required if key not in config]
    if missing:
        raise CheckpointError(f"{path} lacks the key(s) {missing} that {name} needs; {_redownload_hint(name)}")
    return config, is_diffusers


def build_on_meta(model_cls: type, config: dict[str, Any], config_path: Path) -> nn.Module:
    """`model_cls(**config)` on the meta device (no memory); a config that does not fit names `config_path`."""
    try:
        with torch.device("meta"):
            return model_cls(**config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path} does not describe a valid {model_cls.__name__}: {error}") from None


def read_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch checkpoint, memory-mapped where the format allows, without running pickled code."""
    checkpoint = tensor_state_dict(read_torch_file(path, "VAE checkpoint"), path)
    if any(key.startswith(KEY_PREFIX) for key in checkpoint):
        return {key[len(KEY_PREFIX) :]: value for key, value in checkpoint.items() if key.startswith(KEY_PREFIX)}
    return checkpoint


def _squeeze_single_frame(tensor: torch.Tensor, want: torch.Tensor | None) -> torch.Tensor:
    """A 5-D conv weight with one frame, (O, I, 1, k, k), as the 4-D weight the 2D model holds."""
    if want is not None and tensor.ndim == want.ndim + 1 == 5 and tensor.shape[2] == 1:
        return tensor.squeeze(2)
    return tensor


def _fit_to_model(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path, model_name: str
) -> dict[str, torch.Tensor]:
    """Squeeze one-frame 5-D conv weights where the model has 4-D ones; raise on missing/extra/misshapen keys."""
    fitted, wrong_shape = {}, []
    for key, tensor in state.items():
        want = expected.get(key)
        tensor = _squeeze_single_frame(tensor, want)
        if want is not None and tensor.shape != want.shape:
            wrong_shape.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(want.shape)}")
        fitted[key] = tensor
    missing = [key for key in expected if key not in fitted]
    unexpected = [key for key in fitted if key not in expected]
    if missing or unexpected or wrong_shape:
        lines = [f"{path} does not fit {model_name} built from its config.json:"]
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)):
            if items:
                lines.append(f"  {len(items)} {what}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}")
        lines.append("Check that the checkpoint and config.json come from the same release folder.")
        raise CheckpointError("\n".join(lines))
    return fitted


def _diffusers_key_map(model: nn.Module) -> dict[str, str]:
    keys = model.state_dict().keys()
    if type(model).__name__ == "HunyuanVAE2D":  # by name: loaders import no model class
        levels = model.config.ffactor_spatial.bit_length() - 1  # a power of two, checked by the model's config
        return vae_2d_key_map(keys, model.config.layers_per_block, levels)
    return refiner_vae_key_map(keys)


def _from_diffusers_keys(model: nn.Module) -> Translate:
    """Renames a diffusers file's keys to the official ones while its tensors are streamed."""
    to_official = {diffusers: official for official, diffusers in _diffusers_key_map(model).items()}
    expected = model.state_dict()

    def translate(keys: Iterable[str], get_tensor: GetTensor) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            official = to_official.get(key, key)
            yield official, _squeeze_single_frame(get_tensor(key), expected.get(official))

    return translate


def load_vae(
    model_cls: type,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    verify: bool = False,
) -> nn.Module:
    """Build `model_cls` from `directory`/config.json on meta and fill it from the folder's checkpoint.

    `verify`: refuse NaN/Inf weights, naming the tensor and the file.
    """
    directory = Path(directory)
    name = model_cls.__name__
    if not directory.is_dir():
        raise FileNotFoundError(
            f"VAE folder {directory} does not exist; pass the released {RELEASE_FOLDERS.get(name, 'VAE')} folder "
            "(config.json + pytorch_model.ckpt/.pt) or a diffusers VAE folder"
        )
    config_path = directory / CONFIG_FILE
    config, is_diffusers = read_vae_config(config_path, model_cls)
    model = build_on_meta(model_cls, config, config_path)

    release = [directory / file for file in RELEASE_FILES if os.path.lexists(directory / file)]
    diffusers_file = directory / DIFFUSERS_FILE
    if release and not is_diffusers:
        state = _fit_to_model(read_torch_checkpoint(release[0]), model.state_dict(), release[0], name)
        if verify:
            check_state_finite(state, release[0])
        state = {
            key: value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
            for key, value in state.items()
        }
        model.load_state_dict(state, strict=True, assign=True)
        source = release[0]
    elif diffusers_file.is_file():
        load_safetensors_into(
            model,
            [TensorSource(diffusers_file, _from_diffusers_keys(model))],
            dtype=dtype,
            device=device,
            verify=verify,
        )
        source = diffusers_file
    else:
        expected = " or ".join(RELEASE_FILES) if not is_diffusers else DIFFUSERS_FILE
        raise FileNotFoundError(f"{directory} has no VAE weights ({expected}); {_redownload_hint(name)}")
    logger.info("loaded {} from {}", name, source)
    return model.requires_grad_(False).eval()
