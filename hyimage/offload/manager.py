"""Placement of pipeline parts around the stage that uses them.

Three memory modes, one switch:
- "none":  every part moves to the device once and stays there (fastest, needs the most memory).
- "model": each part is on the device only while it runs (the official pipeline's offloading); its host
           copy stays in place, so leaving the stage drops the device copy instead of copying back.
- "block": like "model", and the parts made of block lists (the DiT, the text encoder) are
           streamed block by block from pinned host memory, keeping as many blocks resident
           as `gpu_budget_gb` allows (see `hyimage.offload.streaming`).
"""

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import nn

from hyimage.offload.streaming import BlockStreamer, DeviceCopy

MEMORY_MODES = ("none", "model", "block")


class Movable(Protocol):
    def to(self, device: torch.device) -> object: ...


class MemoryManager:
    """Moves a part onto the execution device for the stage that runs it.

    `gpu_budget_gb` bounds the weights a streamed part keeps on the device in mode "block"
    (activations come on top); None streams every block.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        mode: str = "none",
        gpu_budget_gb: float | None = None,
        offload_device: str | torch.device = "cpu",
    ) -> None:
        if mode not in MEMORY_MODES:
            raise ValueError(f"memory mode {mode!r} is unknown; choose one of {', '.join(MEMORY_MODES)}")
        if gpu_budget_gb is not None and gpu_budget_gb <= 0:
            raise ValueError(f"gpu_budget_gb must be positive, got {gpu_budget_gb}")
        self.device = torch.device(device)
        self.mode = mode
        self.gpu_budget_gb = gpu_budget_gb
        self.offload_device = torch.device(offload_device)
        self._streamers: weakref.WeakKeyDictionary[nn.Module, BlockStreamer] = weakref.WeakKeyDictionary()

    def to(self, device: str | torch.device) -> "MemoryManager":
        """Run parts on `device` from now on."""
        self.device = torch.device(device)
        self._streamers.clear()
        return self

    @contextmanager
    def running(self, module: Movable) -> Iterator[Movable]:
        """Context in which `module` is ready to run on `self.device`."""
        if self.mode == "none":
            module.to(self.device)
            yield module
            return
        if not isinstance(module, nn.Module):
            module.to(self.device)
            try:
                yield module
            finally:
                module.to(self.offload_device)
            return
        placer = self.streamer(module) if self.mode == "block" else None
        if placer is None:
            placer = DeviceCopy(module, self.device, self.offload_device)
        placer.attach()
        try:
            yield module
        finally:
            placer.detach()

    def forget(self, module: Movable) -> None:
        """Drop the block streamer of `module`, so the next run streams its tensors as they are now."""
        if isinstance(module, nn.Module):
            self._streamers.pop(module, None)

    def streamer(self, module: Movable) -> BlockStreamer | None:
        """The block streamer of `module`, or None when it has no block lists to stream."""
        if not isinstance(module, nn.Module):
            return None
        if module not in self._streamers:
            budget = None if self.gpu_budget_gb is None else int(self.gpu_budget_gb * 1024**3)
            streamer = BlockStreamer(module, self.device, budget, self.offload_device)
            if not streamer.plan.resident and not streamer.plan.streamed:
                return None
            self._streamers[module] = streamer
        return self._streamers[module]
