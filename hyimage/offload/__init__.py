"""Where each part lives while the pipeline runs: GPU, CPU, or streamed block by block."""

from hyimage.offload.manager import MemoryManager

__all__ = ["MemoryManager"]
