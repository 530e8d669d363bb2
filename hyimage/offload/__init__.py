"""Where each part lives while the pipeline runs (GPU, CPU, streamed block by block) and the memory plan.

    weights.py      what a part weighs (knows no model class)     dit_weights.py  the DiT in each format
    request.py      what a plan is made for                        activations.py  activation peaks
    needs.py        what each stage needs                          planner.py      GPU placement per stage
    host_plan.py    host RAM across a call                         host.py         the keeper that releases parts
    manager.py      MemoryManager, the one switch of the pipelines streaming.py    block streaming
    pinned.py       one page-locked buffer per streamed block      spans.py        consecutive tensors copied as one
    machine.py      the host budget read from the machine          ways_out.py     what would make a refused plan fit

Parts declare their stage (`memory_stage`); the manager reads it. May import models, quantization, loading,
lora and the bottom modules; not the pipelines, text encoders or CLI.
"""

from hyimage.offload.manager import MEMORY_MODES, MemoryManager
from hyimage.offload.streaming import BlockStreamer, find_block_lists

__all__ = ["MEMORY_MODES", "BlockStreamer", "MemoryManager", "find_block_lists"]
