"""First-Block Cache (ParaAttention's dynamic caching, as diffusers' `FirstBlockCacheConfig` computes it).

Every step runs the first transformer block. Its residual (image tokens out minus in) is compared with the one
of the last step that ran every block: when mean|r - r_prev| / mean|r_prev| <= `threshold`, the other blocks
are skipped and their cached residual (last full output minus the first block's output then, image and text
tokens) is added to this step's first-block output. diffusers decides once per call over its whole batch and
runs classifier-free guidance's two halves as separate calls; here the batch [unconditional; conditional]
runs as one call and each sample decides alone (the same decisions as diffusers' two calls, and batches of
several prompts decide per image). The samples that need it run the remaining blocks as a smaller batch;
the skipped blocks are never called, so block streaming does not fetch them. Under sequence parallelism the
sums behind the ratio are all-reduced first, so every rank makes the same decision.
"""

from typing import Any

import torch

from hyimage.cache.base import Forward, StepCache
from hyimage.models.dit.model import BlockPass


class FirstBlockCache(StepCache):
    """`threshold`: the relative change of the first block's residual below which a sample reuses the cache."""

    kind = "fbcache"

    def __init__(self, threshold: float) -> None:
        super().__init__(threshold=threshold)
        self.threshold = threshold
        self.head_residual: torch.Tensor | None = None
        self.tail_residual: torch.Tensor | None = None

    def reset(self, group: Any = None) -> None:
        super().reset(group)
        self.head_residual = self.tail_residual = None

    def wrap(self, forward: Forward) -> Forward:
        def cached(dit: torch.nn.Module, compute_dtype: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            return forward(dit, compute_dtype, *args, block_cache=self, **kwargs)

        return cached

    def __call__(self, blocks: BlockPass, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """The blocks' output [img; txt] tokens, each sample from its blocks or from the cache."""
        head_img, head_txt = blocks.first(img, txt)
        residual = head_img - img
        full = self._decide(residual, head_txt.shape[1])
        self.record(full)
        head = torch.cat([head_img, head_txt], dim=1)
        if all(full):
            x = blocks.rest(head_img, head_txt)
            self.head_residual, self.tail_residual = residual, x - head
            return x
        x = self.tail_residual + head
        if any(full):
            rows = torch.tensor([i for i, f in enumerate(full) if f], device=img.device)
            computed = blocks.rest(head_img, head_txt, rows)
            x[rows] = computed
            self.head_residual[rows] = residual[rows]
            self.tail_residual[rows] = computed - head[rows]
        return x

    def _decide(self, residual: torch.Tensor, text_tokens: int) -> list[bool]:
        """Per sample: whether to run the other blocks (always on the first call, or when the shapes changed)."""
        prev = self.head_residual
        tail = self.tail_residual
        if prev is None or prev.shape != residual.shape or tail.shape[1] != residual.shape[1] + text_tokens:
            return [True] * residual.shape[0]
        change = (residual - prev).abs().flatten(1)
        size = prev.abs().flatten(1)
        if self.group is None:
            ratio = change.mean(1, dtype=torch.float32) / size.mean(1, dtype=torch.float32)
        else:
            import torch.distributed as dist  # deferred: only sequence parallelism needs it

            sums = torch.stack([change.sum(1, dtype=torch.float32), size.sum(1, dtype=torch.float32)])
            dist.all_reduce(sums, group=self.group)
            ratio = sums[0] / sums[1]
        # Compared as Python floats, as diffusers does (a NaN ratio skips, as there).
        return [value > self.threshold for value in ratio.tolist()]
