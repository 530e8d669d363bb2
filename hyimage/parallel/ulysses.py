"""Ulysses sequence parallelism for the DiT, installed from outside the model with module hooks.

Inside `SequenceParallel(dit, group)`, each of the group's S ranks keeps a contiguous 1/S of the image tokens
(with their RoPE angles) and a contiguous 1/S of the text tokens (text and glyph, as the first double-stream
block receives them) through every block. Around each attention of the double- and single-stream blocks,
all-to-alls trade the token split for a head split: each rank then attends over all image and text tokens
with its share of the heads (the key mask is the model's, which covers all text tokens), and all-to-alls trade
back. Per-token layers need no communication. The final layer's output is gathered over the image tokens, so
every rank returns the whole prediction. Softmax attention is exact per head, so the result is the
single-process one up to floating-point summation order.

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
        self.text: list[int] | None = None
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
            raise ValueError(
                f"sequence parallelism over {self.size} ranks needs at least as many heads; the DiT has {heads}"
            )
        self.heads = even_split(heads, self.size)
        blocks = [*dit.double_blocks, *dit.single_blocks]
        self.double_type = type(dit.double_blocks[0]) if len(dit.double_blocks) else ()
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
        self.text = None
        start, end = self._bounds(self.tokens, self.rank)
        return img[:, start:end]

    def _enter_block(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """RoPE angles (cos, sin) for the whole grid become this rank's rows; the first double-stream block's text
        tokens (its `txt`) this rank's share; attention goes through `_attend`."""
        start, end = self._bounds(self.tokens, self.rank)
        total = sum(self.tokens)
        if self.text is None:
            if not isinstance(module, self.double_type):
                raise ValueError("sequence parallelism splits the text tokens at the first double-stream block")
            args, kwargs = list(args), dict(kwargs)
            txt = args[1] if len(args) > 1 else kwargs["txt"]
            self.text = even_split(txt.shape[1], self.size)
            text_start, text_end = self._bounds(self.text, self.rank)
            if len(args) > 1:
                args[1] = txt[:, text_start:text_end]
            else:
                kwargs["txt"] = txt[:, text_start:text_end]

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
        """q, k, v: (B, local image + local text tokens, H, D) -> the same, as single-process attention gives."""
        local = self.tokens[self.rank]
        batch, _, _, dim = q.shape
        mine = self.heads[self.rank]
        heads = [self._bounds(self.heads, j) for j in range(self.size)]

        def to_heads(x: torch.Tensor, split: list[int]) -> torch.Tensor:
            send = [x[:, :, a:b] for a, b in heads]
            return torch.cat(exchange(send, [(batch, n, mine, dim) for n in split], self.group), dim=1)

        def to_tokens(x: torch.Tensor, split: list[int]) -> torch.Tensor:
            send = [x[:, a:b] for a, b in (self._bounds(split, j) for j in range(self.size))]
            mine_tokens = split[self.rank]
            shapes = [(batch, mine_tokens, h, dim) for h in self.heads]
            return torch.cat(exchange(send, shapes, self.group), dim=2)

        def whole(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([to_heads(x[:, :local], self.tokens), to_heads(x[:, local:], self.text)], dim=1)

        if not isinstance(mask, AttentionMask):
            mask = AttentionMask.from_key_mask(mask)
        key_mask = mask.key_mask  # (B, image + ALL text tokens): the model builds it from the whole text
        total = sum(self.tokens)
        if key_mask is not None:
            text_keys = key_mask[:, key_mask.shape[1] - sum(self.text) :]
            key_mask = torch.cat([key_mask.new_ones(batch, total), text_keys], dim=1)
        with attention_override(None):
            out = attention(whole(q), whole(k), whole(v), AttentionMask.from_key_mask(key_mask))
        return torch.cat([to_tokens(out[:, :total], self.tokens), to_tokens(out[:, total:], self.text)], dim=1)
