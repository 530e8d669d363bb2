"""Memory modes: same outputs in every mode, block streaming hooks run and plan as the budget says."""

import pytest
import torch
from torch import nn

from hyimage.offload import MEMORY_MODES, MemoryManager, find_block_lists


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.register_buffer("gain", torch.full((width,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gain * torch.tanh(self.fc(self.norm(x)))


class Stack(nn.Module):
    """Two block lists around an embedding and a head, like the DiT's double/single blocks."""

    def __init__(self, width: int = 32, double: int = 3, single: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.double_blocks = nn.ModuleList(Block(width) for _ in range(double))
        self.single_blocks = nn.ModuleList(Block(width) for _ in range(single))
        self.tiny = nn.ModuleList(nn.Linear(1, 1) for _ in range(2))
        self.head = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in (*self.double_blocks, *self.single_blocks):
            x = block(x)
        return self.head(x)


def run(model: nn.Module, memory: MemoryManager, x: torch.Tensor, steps: int = 2) -> torch.Tensor:
    with memory.running(model), torch.no_grad():
        for _ in range(steps):
            x = model(x)
    return x


def block_bytes(model: Stack) -> int:
    block = model.double_blocks[0]
    return sum(t.numel() * t.element_size() for t in (*block.parameters(), *block.buffers()))


def test_block_lists_found_outermost_and_sizeable() -> None:
    names = [name for name, _ in find_block_lists(Stack())]
    assert names == ["double_blocks", "single_blocks"]


@pytest.mark.parametrize("budget_blocks", [None, 3.5, 100])
def test_modes_give_identical_outputs(budget_blocks: float | None) -> None:
    model = Stack()
    x = torch.randn(2, 5, 8)
    reference = run(model, MemoryManager("cpu", "none"), x)
    budget = None if budget_blocks is None else budget_blocks * block_bytes(model) / 1024**3
    for mode in MEMORY_MODES:
        out = run(model, MemoryManager("cpu", mode, gpu_budget_gb=budget), x)
        assert torch.equal(out, reference), mode


def test_block_hooks_run_and_follow_the_budget() -> None:
    model = Stack()
    size = block_bytes(model)
    rest = sum(p.numel() * p.element_size() for m in (model.embed, model.head, model.tiny) for p in m.parameters())
    memory = MemoryManager("cpu", "block", gpu_budget_gb=(rest + 4.5 * size) / 1024**3)
    streamer = memory.streamer(model)
    # two blocks' room is kept for the stream buffers, so 2 of the 7 blocks stay resident
    assert streamer.plan.resident == ["double_blocks.0", "double_blocks.1"]
    assert streamer.plan.streamed == ["double_blocks.2", *(f"single_blocks.{i}" for i in range(4))]
    assert streamer.plan.device_bytes <= memory.gpu_budget_gb * 1024**3

    run(model, memory, torch.randn(1, 3, 8), steps=3)
    assert streamer.counts["load"] == 3 * 5
    assert streamer.counts["release"] == 3 * 5
    assert streamer.counts["late_copy"] == 0  # every streamed block was prefetched before it ran
    assert streamer.counts["prefetch"] == 3 * 5 + 1  # one per block, plus the wrap-around after the last step
    assert not any(block._forward_pre_hooks or block._forward_hooks for block in model.single_blocks)
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("mode, budget_blocks", [("model", None), ("block", None), ("block", 4.5)])
def test_parts_come_back_to_their_own_host_tensors(mode: str, budget_blocks: float | None) -> None:
    """After a stage the module holds the very host tensors it had (nothing reallocated or copied back)."""
    model = Stack()
    before = {name: (t.data_ptr(), t.clone()) for name, t in model.state_dict().items()}
    budget = None if budget_blocks is None else budget_blocks * block_bytes(model) / 1024**3
    run(model, MemoryManager("cpu", mode, gpu_budget_gb=budget), torch.randn(1, 3, 8))
    after = model.state_dict()
    assert all(after[k].data_ptr() == ptr and torch.equal(after[k], value) for k, (ptr, value) in before.items())


def test_budget_none_streams_all_and_large_budget_keeps_all() -> None:
    model = Stack()
    assert len(MemoryManager("cpu", "block").streamer(model).plan.streamed) == 7
    large = MemoryManager("cpu", "block", gpu_budget_gb=1.0).streamer(model)
    assert large.plan.streamed == [] and len(large.plan.resident) == 7


def test_part_without_block_lists_falls_back_to_model_offloading() -> None:
    memory = MemoryManager("cpu", "block")
    assert memory.streamer(nn.Linear(4, 4)) is None
    with memory.running(nn.Linear(4, 4)) as part:
        assert part(torch.ones(1, 4)).shape == (1, 4)


def test_bad_mode_and_budget_are_named() -> None:
    with pytest.raises(ValueError, match="memory mode 'disk'"):
        MemoryManager("cpu", "disk")
    with pytest.raises(ValueError, match="gpu_budget_gb"):
        MemoryManager("cpu", "block", gpu_budget_gb=0)


def test_tiny_dit_modes_agree() -> None:
    model_module = pytest.importorskip("hyimage.models.dit.model")
    config = dict(
        patch_size=[1, 1], in_channels=4, out_channels=4, hidden_size=64, heads_num=2, mlp_width_ratio=2.0,
        mm_double_blocks_depth=2, mm_single_blocks_depth=3, rope_dim_list=[16, 16], text_states_dim=32,
        glyph_byT5_v2=False, dtype=torch.float32,
    )
    dit = model_module.HYImageDiffusionTransformer(**config).eval()
    x = torch.randn(1, 4, 4, 4)
    t = torch.tensor([500.0])
    text = torch.randn(1, 6, 32)
    mask = torch.ones(1, 6, dtype=torch.long)

    def denoise(memory: MemoryManager) -> torch.Tensor:
        with memory.running(dit), torch.no_grad():
            return dit(x, t, text, mask)

    reference = denoise(MemoryManager("cpu", "none"))
    memory = MemoryManager("cpu", "block")
    assert torch.equal(denoise(MemoryManager("cpu", "model")), reference)
    assert torch.equal(denoise(memory), reference)
    streamer = memory.streamer(dit)
    assert {"double_blocks.1", "single_blocks.2"} <= set(streamer.plan.streamed)
    assert streamer.counts["load"] == len(streamer.plan.streamed)


def test_full_size_models_stream_their_block_lists() -> None:
    """At the released sizes (on meta): the DiT streams double/single blocks, the text encoder its decoder layers."""
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    from hyimage.models.dit.configs import resolve_dit_config
    from hyimage.models.dit.model import HYImageDiffusionTransformer
    from hyimage.text_encoders.mllm import MLLMTextEncoder

    with torch.device("meta"):
        dit = HYImageDiffusionTransformer(**resolve_dit_config("hunyuanimage-v2.1").to_dict())
        qwen = Qwen2_5_VLTextModel(
            Qwen2_5_VLTextConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=26,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
        )
    assert [name for name, _ in find_block_lists(dit)] == ["double_blocks", "single_blocks"]
    assert [name for name, _ in find_block_lists(MLLMTextEncoder(qwen, tokenizer=None))] == ["model.layers"]
    plan = MemoryManager("cuda", "block", gpu_budget_gb=16).streamer(dit).plan
    assert 0 < len(plan.resident) < 60 and plan.device_bytes <= 16 * 1024**3
