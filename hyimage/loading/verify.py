"""`verify=True` at load time: every floating weight is scanned for NaN and Inf, naming the tensor and the file.

A damaged checkpoint with a NaN in one weight otherwise loads silently and turns every image black. The scan runs
on each tensor as it is read (no second copy of the checkpoint), in chunks so that its scratch memory stays small,
as one min/max reduction per chunk (NaN propagates through it); the values are counted only when one is found.
Measured with benchmarks/bench_verify_load.py.
"""

import os
from collections.abc import Iterable, Mapping

import torch

from hyimage.errors import NonFiniteWeightError

CHUNK_ELEMENTS = 1 << 24


def _count_non_finite(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, infinity count) of a floating tensor, scanned chunk by chunk."""
    flat = tensor.detach().reshape(-1)
    nan = inf = 0
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        chunk = flat[start : start + CHUNK_ELEMENTS]
        if chunk.dtype.itemsize == 1:
            chunk = chunk.to(torch.float16)  # float8: every value is representable in float16
        low, high = torch.aminmax(chunk)  # NaN propagates; one pass, no mask: 60x faster than isfinite().all()
        if bool(torch.isfinite(low) & torch.isfinite(high)):
            continue
        nan += int(torch.isnan(chunk).sum())
        inf += int(torch.isinf(chunk).sum())
    return nan, inf


def check_finite(name: str, tensor: torch.Tensor, source: str | os.PathLike) -> None:
    """Raise NonFiniteWeightError if the floating tensor `name` read from `source` holds NaN or Inf."""
    if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() == 0:
        return
    nan, inf = _count_non_finite(tensor)
    if nan or inf:
        raise NonFiniteWeightError(
            f"{source}: tensor {name!r} holds {nan} NaN and {inf} infinite values among its {tensor.numel()}; "
            "the checkpoint is damaged: delete it and download it again"
        )


def check_state_finite(
    state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], source: str | os.PathLike
) -> None:
    """`check_finite` on every tensor of a state dict (or of (name, tensor) pairs) that came from `source`."""
    items = state.items() if isinstance(state, Mapping) else state
    for name, tensor in items:
        check_finite(name, tensor, source)
