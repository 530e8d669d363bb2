"""TaylorSeer (Liu et al. 2025, arXiv 2503.06923) on the DiT's output, as diffusers' `TaylorSeerCacheConfig`
with `use_lite_mode=True` does it: the output of each full step is kept with its divided differences up to
`order`, and the steps in between are the Taylor expansion from the last full step.

Step i (from 0) runs the DiT when i < `warmup` or (i - warmup - 1) % `interval` == 0, diffusers' rule
(`disable_cache_before_step` = warmup, `cache_interval` = interval, `max_order` = order). diffusers' lite mode
predicts `proj_out`'s output and still runs the embedders and zeroed blocks; the prediction is the same
elementwise expansion, so here a predicted step calls nothing at all. The factors are kept in float32
(diffusers' default is bfloat16): for a float32 DiT the numbers are diffusers' own.
"""

import math
from typing import Any

import torch

from hyimage.cache.base import Forward, StepCache

FACTOR_DTYPE = torch.float32


class TaylorSeerCache(StepCache):
    """Full DiT evaluations every `interval` steps after `warmup` full ones; Taylor predictions of `order`."""

    kind = "taylorseer"

    def __init__(self, interval: int, order: int, warmup: int) -> None:
        super().__init__(interval=interval, order=order, warmup=warmup)
        self.interval, self.order, self.warmup = interval, order, warmup
        self.step = 0
        self.last_full: int | None = None
        self.factors: list[torch.Tensor] = []

    def reset(self, group: Any = None) -> None:
        super().reset(group)
        self.step, self.last_full, self.factors = 0, None, []

    def runs_full(self, step: int) -> bool:
        """Whether step `step` (from 0) evaluates the DiT."""
        return step < self.warmup or (step - self.warmup - 1) % self.interval == 0

    def wrap(self, forward: Forward) -> Forward:
        def cached(dit: torch.nn.Module, compute_dtype: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            step, self.step = self.step, self.step + 1
            if self.runs_full(step) or not self.factors:
                out = forward(dit, compute_dtype, *args, **kwargs)
                self._update(out, step)
                self.record([True] * out.shape[0])
                return out
            self.record([False] * self.factors[0].shape[0])
            return self._predict(step)

        return cached

    def _update(self, out: torch.Tensor, step: int) -> None:
        """The new output and its divided differences against the last full step's factors."""
        factors = [out.to(FACTOR_DTYPE)]
        if self.last_full is not None:
            delta = step - self.last_full
            for j in range(self.order):
                if j >= len(self.factors) or self.factors[j].shape != factors[j].shape:
                    break
                factors.append((factors[j] - self.factors[j]) / delta)
        self.factors, self.last_full, self.dtype = factors, step, out.dtype

    def _predict(self, step: int) -> torch.Tensor:
        offset = step - self.last_full
        out = torch.zeros_like(self.factors[0])
        for order, factor in enumerate(self.factors):
            out = out + factor * (offset**order / math.factorial(order))
        return out.to(self.dtype)
