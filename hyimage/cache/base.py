"""What every step cache shares: a per-call reset, the wrapped DiT forward, and the record of its decisions."""

from collections.abc import Callable
from typing import Any

from loguru import logger

from hyimage.cache.options import describe_cache

Forward = Callable[..., Any]
"""A denoising loop's DiT call: `forward(dit, compute_dtype, latents, timestep, ...) -> prediction`."""


class StepCache:
    """A step cache: `reset` at the start of each pipeline call, then `wrap` the loop's DiT forward."""

    kind = ""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.decisions: list[list[bool]] = []
        self.group: Any = None

    def reset(self, group: Any = None) -> None:
        """Forget everything cached (a new call). `group`: the sequence-parallel process group, or None."""
        self.decisions = []
        self.group = group

    def wrap(self, forward: Forward) -> Forward:
        raise NotImplementedError

    def record(self, full: list[bool]) -> None:
        """One DiT call's decision per sample of its batch (True: all blocks ran)."""
        self.decisions.append(full)
        logger.debug("{} step {}: {}", self.kind, len(self.decisions) - 1, "".join("F" if f else "c" for f in full))

    def stats(self) -> dict[str, Any]:
        """The last call's decisions: `full_steps` ran every block for at least one sample, `cached_steps` for
        none; `full_per_sample` counts per sample of the DiT's batch ([unconditional; conditional] under CFG)."""
        samples = max((len(d) for d in self.decisions), default=0)
        return {
            "cache": describe_cache(self.kind, self.options),
            "steps": len(self.decisions),
            "full_steps": sum(any(d) for d in self.decisions),
            "cached_steps": sum(not any(d) for d in self.decisions),
            "full_per_sample": [sum(d[i] for d in self.decisions if i < len(d)) for i in range(samples)],
            "decisions": ["".join("F" if f else "c" for f in d) for d in self.decisions],
        }
