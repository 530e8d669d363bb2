"""The image size of a call: explicit sides, an aspect-ratio preset, or the starting latents given."""

from typing import Any

import torch

from hyimage.variants import ASPECT_RATIOS


def resolve_size(width: int | None, height: int | None, aspect_ratio: str | None, factor: int) -> tuple[int, int]:
    """Width and height from explicit sizes or an aspect-ratio preset, checked against the VAE factor."""
    if aspect_ratio is not None:
        if width is not None or height is not None:
            raise ValueError("pass either `aspect_ratio` or `width`/`height`, not both")
        if aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"aspect_ratio {aspect_ratio!r} is unknown; choose one of {', '.join(ASPECT_RATIOS)}")
        width, height = ASPECT_RATIOS[aspect_ratio]
    width = 2048 if width is None else width
    height = 2048 if height is None else height
    for name, value in (("width", width), ("height", height)):
        if value < factor or value % factor:
            raise ValueError(
                f"`{name}`={value} must be a positive multiple of {factor} (the VAE's downsampling factor); "
                f"e.g. {max(factor, round(value / factor) * factor)}"
            )
    return width, height


def size_from_latents(
    latents: torch.Tensor,
    batch: int,
    width: int | None,
    height: int | None,
    aspect_ratio: str | None,
    factor: int,
    dit_cfg: Any,
) -> tuple[int, int]:
    expected_ndim = 2 + len(dit_cfg.patch_size)
    if latents.ndim != expected_ndim or latents.shape[0] != batch or latents.shape[1] != dit_cfg.in_channels:
        raise ValueError(
            f"`latents` must be ({batch}, {dit_cfg.in_channels}, {'1, ' if expected_ndim == 5 else ''}h, w) for "
            f"{batch} images; got {tuple(latents.shape)}"
        )
    size = (latents.shape[-1] * factor, latents.shape[-2] * factor)
    if aspect_ratio is not None or width is not None or height is not None:
        asked = resolve_size(width, height, aspect_ratio, factor)
        if asked != size:
            raise ValueError(
                f"`latents` are for {size[0]}x{size[1]} images but {asked[0]}x{asked[1]} was asked for"
            )
    return size
