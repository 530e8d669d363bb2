"""What a part weighs on the GPU and in pinned host memory, for the memory plan: language models from their
configurations, any module as the block streamer splits it (its rest and each streamable block). It knows no model
class; the DiT's formats are `hyimage.offload.dit_weights`.
"""

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hyimage.offload.pinned import packed_size
from hyimage.offload.streaming import find_block_lists

GIB = 1024**3


@dataclass
class Part:
    """The weights of one part as the GPU sees them: the rest and each streamable block, in bytes."""

    rest: int
    blocks: list[int] = field(default_factory=list)
    pinned: list[int] | None = field(default=None, compare=False)
    """Per block, the host bytes of its pinned buffer once streamed (`hyimage.offload.pinned.packed_size`); None
    when not known (then the plan counts the streamed blocks as they are)."""

    @property
    def total(self) -> int:
        return self.rest + sum(self.blocks)


def _decoder_layer_params(c: dict) -> int:
    head_dim = c["hidden"] // c["heads"]
    q_o = 2 * c["hidden"] * c["hidden"] + c["hidden"]  # q has a bias in Qwen2.5 (and not in Hunyuan: ~0)
    k_v = 2 * (c["hidden"] * c["kv_heads"] * head_dim + c["kv_heads"] * head_dim)
    mlp = 3 * c["hidden"] * c["intermediate"]
    return q_o + k_v + mlp + 2 * c["hidden"]


def _layer_tensor_params(c: dict) -> list[int]:
    h, kv = c["hidden"], c["kv_heads"] * (c["hidden"] // c["heads"])
    return [h * h, h, h * kv, kv, h * kv, kv, h * h, *[h * c["intermediate"]] * 3, h, h]


def language_model(c: dict, layers: int, *, lm_head: bool, extra: int = 0, itemsize: int = 2) -> Part:
    """A decoder-only language model's weights: embeddings (+ head, + `extra` parameters) and its layers."""
    rest = c["vocab"] * c["hidden"] * (2 if lm_head else 1) + c["hidden"] + extra
    pinned = packed_size(n * itemsize for n in _layer_tensor_params(c))
    return Part(rest * itemsize, [_decoder_layer_params(c) * itemsize] * layers, [pinned] * layers)


def module_part(module: nn.Module) -> Part:
    """The weights of a (meta or real) module, split as the block streamer splits them."""
    lists = find_block_lists(module)
    blocks = [block for _, blocks in lists for block in blocks]
    block_ids = {id(t) for block in blocks for t in (*block.parameters(), *block.buffers())}

    def nbytes(tensors: Any) -> int:
        unique = {id(t): t for t in tensors}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def pinned(tensors: Any) -> int:
        unique = {id(t): t for t in tensors}
        return packed_size(t.numel() * t.element_size() for t in unique.values())

    rest = nbytes(t for t in (*module.parameters(), *module.buffers()) if id(t) not in block_ids)
    return Part(rest, [nbytes((*b.parameters(), *b.buffers())) for b in blocks],
                [pinned((*b.parameters(), *b.buffers())) for b in blocks])


