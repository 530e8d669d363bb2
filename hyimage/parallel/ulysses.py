"""Ulysses sequence parallelism for the DiT, installed from outside the model with module hooks.

Inside `SequenceParallel(dit, group)`, each of the group's S ranks keeps a contiguous 1/S of the image tokens
(with their RoPE angles) through every block, and the text and glyph tokens whole. Around each attention of
the double- and single-stream blocks, an all-to-all trades the token split for a head split: each rank then
attends over all image tokens plus the text tokens with its share of the heads, and a second all-to-all trades
back; the text rows of the output are gathered over the heads, so the text stream stays whole on every rank.
Per-token layers need no communication. The final layer's output is gathered over the tokens, so every rank
returns the whole prediction. Softmax attention is exact per head, so the result is the single-process one up
to floating-point summation order.

Token and head counts need not divide by S: the splits are as even as possible (the first ranks take one more),
so the refiner's 26 heads run on 4 or 8 ranks too (8 ranks: 4 heads on two ranks, 3 on six; the slowest rank
sets the pace, so an even split is faster per GPU).
"""

from collections.abc import Sequence
from math import prod
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hyimage.models.attention import AttentionMask, attention, attention_override


def even_split(total: int, parts: int) -> list[int]:
    """`total` as `parts` sizes differing by at most one, larger first."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def exchange(send: Sequence[torch.Tensor], shapes: Sequence[Sequence[int]], group: Any) -> list[torch.Tensor]:
    """All-to-all: `send[j]` goes to rank j of `group`; returns what each rank j sent here, shaped `shapes[j]`."""
    flat = torch.cat([t.reshape(-1) for t in send])
    sizes = [prod(shape) for shape in shapes]
    received = flat.new_empty(sum(sizes))
    dist.all_to_all_single(received, flat, sizes, [t.numel() for t in send], group=group)
    return [chunk.view(*shape) for chunk, shape in zip(received.split(sizes), shapes)]


class SequenceParallel:
    """While entered, `dit` (a HYImageDiffusionTransformer) runs its image tokens split across `group`."""

    def __init__(self, dit: nn.Module, group: Any) -> None:
        self.dit = dit
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.tokens: list[int] = []
        self._handles: list[Any] = []
        self._overrides: list[Any] = []

    # Splits.
    def _bounds(self, sizes: list[int], rank: int) -> tuple[int, int]:
        start = sum(sizes[:rank])
        return start, start + sizes[rank]

    def __enter__(self) -> "SequenceParallel":
        dit = self.dit
        heads = dit.config.heads_num
        if self.size > heads:
            raise ValueError(f"sequence parallelism over {self.size} ranks needs at least as many heads; the DiT has {heads}")
        self.heads = even_split(heads, self.size)
        blocks = [*dit.double_blocks, *dit.single_blocks]
        self._handles = [
            dit.img_in.register_forward_hook(self._split_tokens),
            dit.final_layer.register_forward_hook(self._gather_tokens),
        ]
        for block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._enter_block, with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._leave_block, always_call=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # Hooks.
    def _split_tokens(self, module: nn.Module, args: Any, img: torch.Tensor) -> torch.Tensor:
        """After the patch embedding: keep this rank's contiguous share of the image tokens."""
        total = img.shape[1]
        if total < self.size:
            raise ValueError(f"{total} image tokens cannot be split over {self.size} ranks; draw a larger image")
        self.tokens = even_split(total, self.size)
        start, end = self._bounds(self.tokens, self.rank)
        return img[:, start:end]

    def _enter_block(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """RoPE angles (cos, sin) for the whole grid become this rank's rows; attention goes through `_attend`."""
        start, end = self._bounds(self.tokens, self.rank)
        total = sum(self.tokens)

        def local(value: Any) -> Any:
            if (
                isinstance(value, tuple)
                and len(value) == 2
                and all(isinstance(t, torch.Tensor) and t.ndim == 2 and t.shape[0] == total for t in value)
            ):
                return tuple(t[start:end] for t in value)
            return value

        override = attention_override(self._attend)
        override.__enter__()
        self._overrides.append(override)
        return tuple(local(a) for a in args), {k: local(v) for k, v in kwargs.items()}

    def _leave_block(self, module: nn.Module, args: Any, output: Any) -> None:
        self._overrides.pop().__exit__(None, None, None)

    def _gather_tokens(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        """After the final layer: every rank gets the prediction for all image tokens."""
        shapes = [(out.shape[0], n, *out.shape[2:]) for n in self.tokens]
        return torch.cat(exchange([out.contiguous()] * self.size, shapes, self.group), dim=1)

    # Attention.
    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | torch.Tensor | None
    ) -> torch.Tensor:
        """q, k, v: (B, local image tokens + text tokens, H, D) -> the same, as single-process attention gives."""
        local = self.tokens[self.rank]
        batch, _, _, dim = q.shape
        head_start, head_end = self._bounds(self.heads, self.rank)
        mine = self.heads[self.rank]
        total = sum(self.tokens)

        def to_heads(x: torch.Tensor) -> torch.Tensor:
            image = x[:, :local]
            send = [image[:, :, a:b] for a, b in (self._bounds(self.heads, j) for j in range(self.size))]
            shapes = [(batch, n, mine, dim) for n in self.tokens]
            whole = torch.cat(exchange(send, shapes, self.group), dim=1)
            return torch.cat([whole, x[:, local:, head_start:head_end]], dim=1)

        if not isinstance(mask, AttentionMask):
            mask = AttentionMask.from_key_mask(mask)
        key_mask = mask.key_mask
        if key_mask is not None:
            key_mask = torch.cat([key_mask.new_ones(batch, total), key_mask[:, local:]], dim=1)
        with attention_override(None):
            out = attention(to_heads(q), to_heads(k), to_heads(v), AttentionMask.from_key_mask(key_mask))

        image, text = out[:, :total], out[:, total:]
        send = [image[:, a:b] for a, b in (self._bounds(self.tokens, j) for j in range(self.size))]
        image = torch.cat(exchange(send, [(batch, local, h, dim) for h in self.heads], self.group), dim=2)
        text_shapes = [(batch, text.shape[1], h, dim) for h in self.heads]
        text = torch.cat(exchange([text.contiguous()] * self.size, text_shapes, self.group), dim=2)
        return torch.cat([image, text], dim=1)
