"""Where each part lives while the pipeline runs: GPU, CPU, or streamed block by block."""

from hyimage.offload.manager import MEMORY_MODES, MemoryManager
from hyimage.offload.streaming import BlockStreamer, find_block_lists

__all__ = ["MEMORY_MODES", "BlockStreamer", "MemoryManager", "find_block_lists"]
