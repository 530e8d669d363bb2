"""The DiT blocks' q|k|v (q|k|v|mlp) projections run split again, for the benchmarks that measure what fusing saves."""

import contextlib
from collections.abc import Iterator

import torch

from hyimage.models.dit import fused


@contextlib.contextmanager
def split_projections() -> Iterator[None]:
    """Inside, every projection group runs its parts one by one (three or four GEMMs, FP8 parts dequantised one at a
    time): the path before `hyimage.models.dit.fused`, on the same weights."""
    path_of = fused.path_of
    fused.path_of = lambda parts: fused.PARTS
    try:
        yield
    finally:
        fused.path_of = path_of


def projection_paths(model: torch.nn.Module) -> set[str]:
    """The paths (`hyimage.models.dit.fused.path_of`) the model's projection groups take now."""
    blocks = [m for m in model.modules() if isinstance(m, fused.PackedProjections)]
    with torch.inference_mode():
        return {fused.path_of(block.group(i)) for block in blocks for i in range(len(block.projection_groups))}
