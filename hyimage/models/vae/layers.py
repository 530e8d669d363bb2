"""Layers and helpers both VAEs build from: the activation, a resolution level, the resampling count."""

import torch
from torch import nn
from torch.nn import functional as F


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), in place when autograd is off (callers pass fresh tensors): one activation less at 2K."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def num_resample_levels(ffactor: int) -> int:
    """How many x2 resamplings give a compression factor of `ffactor` (a power of two)."""
    levels = ffactor.bit_length() - 1
    if ffactor < 1 or 1 << levels != ffactor:
        raise ValueError(f"compression factors must be powers of two, got {ffactor}")
    return levels


class Level(nn.Module):
    """One resolution level: resnet blocks (`block`), then optionally `downsample` or `upsample`."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x
