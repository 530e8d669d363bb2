"""Host RAM kept within `host_budget_gb`: parts released between stages as the memory plan says, read again later.

The plan (`hyimage.offload.planner.plan_host`) says which parts host memory holds at each stage. Before a pipeline
builds a part (and before an exact tiled VAE puts its whole activations in host memory), `HostKeeper.before_build`
releases every built part that the plan does not hold at that stage: each pipeline's part registry (`Parts`) drops
it and goes back to its factory, the memory manager forgets the part's block streamers (which hold it and its pinned
copies), and the freed memory goes back to the operating system: a garbage collection, glibc's `malloc_trim`, and
torch's pinned-memory cache emptied (it keeps freed pinned blocks for reuse). `malloc_trim` because glibc raises its
mmap threshold (up to 32 MB) each time it frees a larger mapped block, after which tensors under it (an FP8 DiT's
3584x3584 weights: 12.8 MB) come from the heap, and a heap interleaved with tensors that stay does not shrink:
measured, 200 tensors of 12 MB freed between small ones kept left 2.35 GiB of RSS without `malloc_trim` and none
with it. A stage the plan refuses raises MemoryError before anything is read. Without a host budget nothing is ever
released.
"""

import ctypes
import gc
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
from loguru import logger

from hyimage.offload.host_plan import HostStep


class PartRegistry(Protocol):
    """What the keeper needs of a pipeline's parts (`hyimage.diffusion.pipelines.parts.Parts`)."""

    before_build: Callable[[str], None] | None

    def loaded(self, name: str) -> Any | None: ...

    def release(self, name: str) -> bool: ...


class HostKeeper:
    """Releases parts from host memory before a stage builds its own, as `plan()` (stage -> HostStep) says."""

    def __init__(self, plan: Callable[[], "dict[str, HostStep] | None"], forget: Callable[[Any], None],
                 check: Callable[[str], None] | None = None) -> None:
        self._plan = plan
        self._forget = forget
        self._check = check
        """Raises for a stage the GPU plan refuses (with the ways out), before its part is read."""
        self._registries: list[tuple[weakref.ref, dict[str, str]]] = []

    def register(self, parts: PartRegistry, stages: dict[str, str]) -> None:
        """Manage `parts`, whose part `name` is the part of stage `stages[name]`; its builds go through the keeper."""
        self._registries.append((weakref.ref(parts), dict(stages)))
        parts.before_build = lambda name: self.before_build(stages.get(name))

    def built(self) -> dict[str, list[Any]]:
        """The built parts per stage (a stage's part may be held by more than one pipeline)."""
        found: dict[str, list[Any]] = {}
        for parts, name, stage in self._entries():
            part = parts.loaded(name)
            if part is not None:
                found.setdefault(stage, []).append(part)
        return found

    def before_build(self, stage: str | None) -> None:
        """Refuse a stage the plan refuses; release the built parts the plan does not hold at `stage`."""
        if stage is not None and self._check is not None:
            self._check(stage)
        plan = self._plan() if stage is not None else None
        if plan is None or stage not in plan:
            return
        step = plan[stage]
        if step.refused:
            raise MemoryError(f"the memory plan refuses the {stage} stage: {step.refused}")
        keep = set(step.held) | {stage}
        released = [owner for parts, name, owner in self._entries() if owner not in keep and self._release(parts, name)]
        if released:
            return_memory()
            logger.info(f"host memory: released {', '.join(dict.fromkeys(released))} before building {stage}")

    def _entries(self) -> list[tuple[PartRegistry, str, str]]:
        entries = []
        for ref, stages in self._registries:
            parts = ref()
            if parts is not None:
                entries.extend((parts, name, stage) for name, stage in stages.items())
        return entries

    def _release(self, parts: PartRegistry, name: str) -> bool:
        part = parts.loaded(name)
        if part is None:
            return False
        if getattr(part, "lora_order", None):
            logger.warning(f"host memory: {name} carries LoRA adapters and is kept (a reload would lose them)")
            return False
        if not parts.release(name):
            return False
        self._forget(part)
        return True


def return_memory() -> None:
    """Hand memory freed by released parts back to the operating system."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch._C._host_emptyCache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        pass
