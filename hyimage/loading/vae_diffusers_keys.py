"""Key maps between the official VAE state dicts and diffusers' conversions of them.

Facts from diffusers' scripts/convert_hunyuan_image_to_diffusers.py: the 2D VAE's resnets and resamplers are
numbered consecutively in `down_blocks` / `up_blocks`; the refiner VAE keeps one block per level
(`resnets.N`, `downsamplers.0` / `upsamplers.0`); mid blocks become `mid_block.resnets.{0,1}` and
`mid_block.attentions.0` with `to_q/to_k/to_v` (and `proj` instead of `proj_out` in the 2D VAE).
Resnet shortcuts are `conv_shortcut` in diffusers (`nin_shortcut` officially).
"""

import re
from collections.abc import Iterable
from typing import Any

_MID = [
    (r"mid\.block_1\.", "mid_block.resnets.0."),
    (r"mid\.block_2\.", "mid_block.resnets.1."),
    (r"mid\.attn_1\.q\.", "mid_block.attentions.0.to_q."),
    (r"mid\.attn_1\.k\.", "mid_block.attentions.0.to_k."),
    (r"mid\.attn_1\.v\.", "mid_block.attentions.0.to_v."),
    (r"mid\.attn_1\.", "mid_block.attentions.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
]


def _rename_mid(key: str, proj_name: str) -> str:
    key = key.replace("mid.attn_1.proj_out.", f"mid.attn_1.{proj_name}.")
    for pattern, replacement in _MID:
        key = re.sub(pattern, replacement, key)
    return key


def vae_2d_key_map(keys: Iterable[str], layers_per_block: int, num_resample_levels: int) -> dict[str, str]:
    """Official HunyuanVAE2D key -> AutoencoderKLHunyuanImage key.

    `num_resample_levels` is log2(ffactor_spatial): the levels before it end with a down/up sampler.
    """

    def flat_index(level: int, block: int | None, blocks_per_level: int) -> int:
        first = level * blocks_per_level + min(level, num_resample_levels)
        return first + (blocks_per_level if block is None else block)

    def rename(key: str) -> str:
        match = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)", key)
        if match:
            part, direction, level, _, block, rest = match.groups()
            per_level = layers_per_block + (1 if part == "decoder" else 0)
            index = flat_index(int(level), None if block is None else int(block), per_level)
            rest = rest.replace("nin_shortcut.", "conv_shortcut.")
            return f"{part}.{direction}_blocks.{index}.{rest}"
        return _rename_mid(key, "proj")

    return {key: rename(key) for key in keys}


def refiner_vae_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Official AutoencoderKLConv3D key -> AutoencoderKLHunyuanImageRefiner key."""

    def rename(key: str) -> str:
        key = re.sub(r"\.(down|up)\.(\d+)\.block\.(\d+)\.", r".\1_blocks.\2.resnets.\3.", key)
        key = re.sub(r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0.", key)
        key = re.sub(r"\.up\.(\d+)\.upsample\.", r".up_blocks.\1.upsamplers.0.", key)
        return _rename_mid(key, "proj_out")

    return {key: rename(key) for key in keys}


_DIFFUSERS_CONFIG_RENAMES = {
    "spatial_compression_ratio": "ffactor_spatial",
    "temporal_compression_ratio": "ffactor_temporal",
}

DIFFUSERS_CLASS_NAMES = {
    "AutoencoderKLHunyuanImage": "HunyuanVAE2D",
    "AutoencoderKLHunyuanImageRefiner": "AutoencoderKLConv3D",
}

# Keys a diffusers config may omit (they size tiles only, or are diffusers' constructor defaults).
_DIFFUSERS_CONFIG_DEFAULTS = {
    "HunyuanVAE2D": {"sample_size": 384, "sample_tsize": 1},
    "AutoencoderKLConv3D": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 32,
        "block_out_channels": [128, 256, 512, 1024, 1024],
        "layers_per_block": 2,
        "ffactor_spatial": 16,
        "ffactor_temporal": 4,
        "sample_size": 256,
        "sample_tsize": 64,
        "scaling_factor": 1.03682,
    },
}


def config_from_diffusers(config: dict[str, Any], model_name: str) -> dict[str, Any]:
    """A diffusers VAE config.json -> the official constructor keys of `model_name`."""
    renamed = {
        _DIFFUSERS_CONFIG_RENAMES.get(key, key): value for key, value in config.items() if not key.startswith("_")
    }
    return {**_DIFFUSERS_CONFIG_DEFAULTS[model_name], **renamed}
