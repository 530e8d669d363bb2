"""One page-locked host buffer per streamed block, at the size of its tensors.

Pinning each tensor with `Tensor.pin_memory()` goes through torch's caching host allocator, which rounds every
allocation up to a power of two: a text-encoder layer's 0.47 GiB of weights took 0.87 GiB pinned, and a single
pinned buffer per block would still round 0.51 GiB up to 1 GiB. So a block's tensors are packed into one uint8
buffer of their own size (each tensor's offset aligned to `ALIGN` bytes, but tensors consecutive in one storage, a
DiT block's packed q|k|v rows, stay consecutive; the whole rounded up to a page) and viewed from it, and the buffer
is page-locked in place with `cudaHostRegister`: pinned bytes are the weights plus at most `ALIGN` bytes per tensor
and one page (under 1.01x for any block of the released models).

The buffer is an anonymous memory map (`mmap`) seen through `torch.frombuffer`: page-aligned, so registering it
locks no page another allocation shares, and owned by the tensor storage, which keeps the map alive while any
view of it exists. The map unregisters itself when it is freed, before its pages are unmapped, so a registered
range never outlives its memory; unmapped pages go straight back to the operating system.
"""

import mmap
from collections.abc import Iterable

import torch
from loguru import logger

from hyimage.offload.spans import runs

ALIGN = 64
"""Byte alignment of each tensor in a packed buffer: a multiple of every element size, and of a cache line."""

PAGE = mmap.PAGESIZE


def aligned(nbytes: int) -> int:
    """`nbytes` rounded up to `ALIGN`."""
    return -(-nbytes // ALIGN) * ALIGN


def packed_size(sizes: Iterable[int]) -> int:
    """Host bytes of the buffer that packs tensors of `sizes` bytes (what a streamed block pins)."""
    total = sum(aligned(n) for n in sizes)
    return -(-total // PAGE) * PAGE if total else 0


class _RegisteredMap(mmap.mmap):
    """An anonymous map that leaves CUDA's registry before it is unmapped."""

    address: int | None = None

    def __del__(self) -> None:
        if self.address is not None:
            torch.cuda.cudart().cudaHostUnregister(self.address)
            self.address = None


def _buffer(nbytes: int) -> tuple[torch.Tensor, _RegisteredMap]:
    memory = _RegisteredMap(-1, max(nbytes, 1))
    return torch.frombuffer(memory, dtype=torch.uint8)[:nbytes], memory


def pack(tensors: list[torch.Tensor], pin: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One host buffer holding a copy of each of `tensors`, and the views of it in their order, shapes and dtypes
    (contiguous). Tensors consecutive in one storage (`hyimage.offload.spans.runs`) stay consecutive in the buffer.
    `pin`: page-lock the buffer for asynchronous copies to CUDA (left pageable, with a warning, if the driver
    refuses)."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    buffer, memory = _buffer(packed_size(sizes))
    views: list[torch.Tensor | None] = [None] * len(tensors)
    offset = 0
    for run in runs(tensors):
        for i in run:
            view = buffer[offset:offset + sizes[i]].view(tensors[i].dtype).view(tensors[i].shape)
            view.copy_(tensors[i])
            views[i] = view
            offset += sizes[i]
        offset = aligned(offset)
    if pin and buffer.numel():
        register(buffer, memory)
    return buffer, views


def register(buffer: torch.Tensor, memory: _RegisteredMap) -> None:
    """Page-lock `buffer` (all of `memory`) in place."""
    address = buffer.data_ptr()
    error = torch.cuda.cudart().cudaHostRegister(address, len(memory), 0)
    if int(error) != 0:  # cudaSuccess
        logger.warning(f"could not pin {len(memory) / 1024**2:.0f} MiB of host memory (CUDA error {int(error)}); "
                       "its blocks are copied from pageable memory (slower)")
        return
    memory.address = address
