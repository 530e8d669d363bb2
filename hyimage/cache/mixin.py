"""`enable_cache` / `disable_cache` on the pipelines, and the one call their denoising loops make."""

from typing import Any

from loguru import logger

from hyimage.cache.base import Forward, StepCache
from hyimage.cache.fbcache import FirstBlockCache
from hyimage.cache.options import check_cache_options, describe_cache
from hyimage.cache.taylorseer import TaylorSeerCache
from hyimage.stages import DIT

CACHE_CLASSES: dict[str, type[StepCache]] = {"fbcache": FirstBlockCache, "taylorseer": TaylorSeerCache}


def make_cache(kind: str, **options: Any) -> StepCache:
    """A step cache: "fbcache" (threshold) or "taylorseer" (interval, order, warmup); options are checked."""
    return CACHE_CLASSES[kind](**check_cache_options(kind, options))


class CacheMixin:
    """Step caching for a pipeline whose loop calls `forward = self.cached_forward(forward)` before its steps."""

    step_cache: StepCache | None = None
    DIT_STAGE = DIT
    """The memory-plan stage of the pipeline's DiT (the refiner pipeline's is `REFINER_DIT`)."""

    def enable_cache(self, kind: str, **options: Any) -> None:
        """Skip or predict DiT work across steps: "fbcache" (`threshold`, float; 0 skips nothing) or
        "taylorseer" (`interval`, `order`, `warmup`). Each call starts with an empty cache; `cache_stats` says
        what the last call did."""
        self.step_cache = make_cache(kind, **options)
        logger.info("step cache {}", describe_cache(kind, self.step_cache.options))
        self._tell_memory((kind, tuple(sorted(self.step_cache.options.items()))))

    def disable_cache(self) -> None:
        """Every step evaluates the whole DiT again (the default)."""
        self.step_cache = None
        self._tell_memory(None)

    def _tell_memory(self, cache: tuple[str, tuple] | None) -> None:
        """The pipeline's memory manager plans the cache's tensors in its DiT's stage (`memory_stage`)."""
        memory = getattr(self, "memory", None)
        if memory is not None:
            memory.cache_changed(self.DIT_STAGE, cache)

    @property
    def cache_stats(self) -> dict[str, Any] | None:
        """The last call's full and cached steps (see `StepCache.stats`), or None without a cache."""
        return None if self.step_cache is None else self.step_cache.stats()

    def cached_forward(self, forward: Forward) -> Forward:
        """`forward` through the step cache, emptied for this call (`forward` itself without one)."""
        if self.step_cache is None:
            return forward
        parallel = getattr(self, "parallel", None)
        self.step_cache.reset(getattr(parallel, "sp_group", None))
        return self.step_cache.wrap(forward)
