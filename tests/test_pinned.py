"""Streamed blocks pinned at their real size: one buffer per block holding exact copies of its tensors, and the
memory plan counting that buffer's bytes (not torch's power-of-two rounding of each tensor)."""

import pytest
import torch
from torch import nn

from hyimage.models.dit.configs import resolve_dit_config
from hyimage.offload import streaming
from hyimage.offload.dit_weights import dit_on_meta
from hyimage.offload.needs import QWEN25VL_7B, TEXT_ENCODER_LAYERS
from hyimage.offload.pinned import pack
from hyimage.offload.streaming import BlockStreamer
from hyimage.offload.weights import language_model, module_part
from hyimage.variants import DISTILLED

PAGE = 4096


def _expected_buffer(sizes: list[int]) -> int:
    """The packed layout written out independently: 64-byte aligned offsets, the whole rounded up to a page."""
    end = 0
    for n in sizes:
        end = (end + 63) // 64 * 64 + n
    end = (end + 63) // 64 * 64
    return (end + PAGE - 1) // PAGE * PAGE


def test_pack_holds_exact_copies_in_one_buffer() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(37, 11, generator=generator),
        torch.randn(5, generator=generator).to(torch.bfloat16),
        torch.randn(64, 33, generator=generator).to(torch.float8_e4m3fn),
        torch.randn(9, 7, generator=generator).t(),  # not contiguous
        torch.arange(3, dtype=torch.int64),
        torch.tensor(0.25),
    ]
    buffer, views = pack(tensors)
    sizes = [t.numel() * t.element_size() for t in tensors]
    assert buffer.dtype == torch.uint8 and buffer.numel() == _expected_buffer(sizes)
    for tensor, view in zip(tensors, views):
        assert view.dtype == tensor.dtype and view.shape == tensor.shape and view.is_contiguous()
        assert torch.equal(view.view(torch.uint8) if view.dtype == torch.float8_e4m3fn else view,
                           tensor.contiguous().view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor)
        assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert (view.data_ptr() - buffer.data_ptr()) % 64 == 0
    spans = sorted((v.data_ptr(), v.data_ptr() + n) for v, n in zip(views, sizes))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no two views overlap
    views[0].add_(1)  # the copies are the buffer's, not the originals'
    assert not torch.equal(views[0], tensors[0])


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 24)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(24), nn.Linear(24, 24), nn.Linear(24, 24))
                                    for _ in range(3))
        self.layers[1][2].weight = self.layers[1][1].weight  # shared within a block: packed once, still shared
        self.head = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x)


def test_streamed_block_is_pinned_as_one_buffer_of_the_planned_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinning (here without CUDA: the packing the streamer does, the page-locking left out) leaves each streamed
    block on one buffer whose size is the plan's figure for that block, with the same outputs."""
    model = Stack().eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        reference = model(x)
    monkeypatch.setattr(streaming, "pack", lambda tensors, pin: pack(tensors, pin=False))
    streamer = BlockStreamer(model, torch.device("cpu"))
    for block in streamer._streamed:
        block.refresh()
        block.pin()
    planned = module_part(model).pinned
    for block, figure in zip(streamer._streamed, planned):
        storages = {slot.host.untyped_storage().data_ptr() for slot in block.slots}
        assert len(storages) == 1
        assert block.slots[0].host.untyped_storage().nbytes() == figure
        assert all(slot.current().data_ptr() == slot.host.data_ptr() for slot in block.slots)  # runs from it
    assert model.layers[1][2].weight is model.layers[1][1].weight
    assert model.layers[1][2].weight.data_ptr() == model.layers[1][1].weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def test_plan_counts_the_pinned_buffers_within_five_percent_of_the_weights() -> None:
    """The text encoder's layer (0.47 GiB, 0.87 GiB once pinned tensor by tensor) and the DiT's blocks."""
    text = language_model(QWEN25VL_7B, TEXT_ENCODER_LAYERS, lm_head=False)
    h, i, kv = QWEN25VL_7B["hidden"], QWEN25VL_7B["intermediate"], 512
    layer = [h * h, h, h * kv, kv, h * kv, kv, h * h, h * i, h * i, h * i, h, h]
    assert text.pinned[0] == _expected_buffer([2 * n for n in layer])
    assert text.blocks[0] <= text.pinned[0] <= 1.05 * text.blocks[0]
    for fp8 in (False, True):
        dit = module_part(dit_on_meta(resolve_dit_config(DISTILLED), fp8))
        assert all(b <= p <= 1.05 * b for b, p in zip(dit.blocks, dit.pinned))
