"""The blocks' q|k|v (q|k|v|mlp) projections as one matmul (models/dit/fused.py): the same numbers as the parts one
by one, the official state dict, and the right path for packed, moved, reassigned, LoRA, FP8, GGUF, pinned and
streamed blocks."""

import pytest
import torch
from torch import nn

from hyimage.lora.keys import LoraUpdate
from hyimage.lora.layers import add_adapter, fuse, remove_adapters, unfuse
from hyimage.models.dit import fused as fused_module
from hyimage.models.dit.fused import FP8_DEQUANT, PARTS, PLAIN, pack, pack_projections, path_of, project
from hyimage.offload import streaming
from hyimage.offload.pinned import pack as pin_pack
from hyimage.offload.spans import copied
from hyimage.offload.streaming import BlockStreamer
from hyimage.quantization.fp8 import convert_to_fp8_linear, fp8_linear_modules
from hyimage.quantization.gguf import GGUFLinear
from tests.fixtures.dit_loading import TINY, run, save, tiny_dit, tiny_inputs
from tests.fixtures.numerics import TOLERANCE, max_rel_error
from tests.fixtures.tiny_dit import TINY_CONFIGS, make_inputs, tiny_model

VARIANT = "hunyuanimage-v2.1"


def groups(model: nn.Module) -> list[list[nn.Module]]:
    blocks = [*model.double_blocks, *model.single_blocks]
    return [block.group(i) for block in blocks for i in range(len(block.projection_groups))]


def paths(model: nn.Module) -> set[str]:
    with torch.inference_mode():
        return {path_of(group) for group in groups(model)}


def unpack(model: nn.Module) -> None:
    """Give every part its own tensors (as a loader or `.data =` does): the parts then run one by one."""
    for group in groups(model):
        for part in group:
            part.weight.data = part.weight.data.clone()
            part.bias.data = part.bias.data.clone()


def forward(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_model(TINY_CONFIGS[VARIANT])


@pytest.fixture(scope="module")
def inputs() -> dict:
    torch.manual_seed(0)
    return make_inputs(TINY_CONFIGS[VARIANT])


def test_built_blocks_are_packed_and_fused_equals_split_in_float32(model, inputs):
    assert paths(model) == {PLAIN}
    fused = forward(model, inputs)
    split_model = tiny_model(TINY_CONFIGS[VARIANT])
    unpack(split_model)
    assert paths(split_model) == {PARTS}
    split = forward(split_model, inputs)
    assert max_rel_error(fused, split) < 1e-6
    assert not torch.equal(fused, torch.zeros_like(fused))


def test_project_equals_each_linear():
    torch.manual_seed(0)
    parts = [nn.Linear(32, n) for n in (32, 32, 32, 128)]
    unpacked = [p.weight.data_ptr() for p in parts]
    assert pack(parts)
    assert [p.weight.data_ptr() for p in parts] != unpacked
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert path_of(parts) == PLAIN
        for ours, part in zip(project(x, parts), parts):
            reference = x @ part.weight.T + part.bias  # not through nn.Linear's own call
            assert max_rel_error(ours, reference) < 1e-6
    with torch.enable_grad():
        assert path_of(parts) == PARTS  # a gradient through a row view would reach only the first part


def test_state_dict_keeps_the_split_names_and_shapes(model):
    """Packing changes where the tensors live, not the state dict: the same keys and shapes as an unpacked build
    (on meta, where nothing is packed; test_dit_structure checks those against the official manifests)."""
    with torch.device("meta"):
        unpacked = type(model)(**TINY_CONFIGS[VARIANT].to_dict())
    assert {k: t.shape for k, t in model.state_dict().items()} == {k: t.shape for k, t in unpacked.state_dict().items()}
    assert "single_blocks.0.linear1_mlp.weight" in model.state_dict()


def test_to_packs_again_and_reassigned_weights_fall_back_until_packed(inputs):
    model = tiny_model(TINY_CONFIGS[VARIANT])
    reference = forward(model, inputs)
    model.to(torch.float64).to(torch.float32)  # a copy per parameter each time
    assert paths(model) == {PLAIN}
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert paths(model) == {PARTS}
    assert max_rel_error(forward(model, inputs), reference) < 1e-6
    pack_projections(model)
    assert paths(model) == {PLAIN}
    assert max_rel_error(forward(model, inputs), reference) < 1e-6


def test_lora_side_branch_runs_the_parts_and_fusing_writes_in_place(inputs):
    model = tiny_model(TINY_CONFIGS[VARIANT])
    generator = torch.Generator().manual_seed(3)
    name = "single_blocks.0.linear1_k"
    update = LoraUpdate(name, torch.randn(4, 64, generator=generator), torch.randn(64, 4, generator=generator) * 0.1)
    add_adapter(model, "style", [update], 1.0)
    block = model.single_blocks[0]
    with torch.inference_mode():
        assert path_of(block.group(0)) == PARTS  # the adapter is a forward hook on linear1_k
        assert path_of(model.double_blocks[0].group(0)) == PLAIN
    side_branch = forward(model, inputs)
    pointers = [part.weight.data_ptr() for part in block.group(0)]
    fuse(model)
    assert [part.weight.data_ptr() for part in block.group(0)] == pointers  # fused in place: still packed
    fused_weights = forward(model, inputs)
    assert max_rel_error(fused_weights, side_branch) < TOLERANCE
    unfuse(model)
    remove_adapters(model)
    assert paths(model) == {PLAIN}
    plain = tiny_model(TINY_CONFIGS[VARIANT])
    assert max_rel_error(forward(model, inputs), forward(plain, inputs)) < 1e-6
    assert max_rel_error(side_branch, forward(plain, inputs)) > 1e-3  # the adapter did change the output


def test_fp8_parts_are_dequantized_together_exactly(inputs, monkeypatch):
    model = tiny_model(TINY_CONFIGS[VARIANT])
    convert_to_fp8_linear(model, fp8_linear_modules(model))
    assert paths(model) == {FP8_DEQUANT}
    parts = model.single_blocks[0].group(0)
    x = torch.randn(2, 5, 64)
    with torch.inference_mode():
        together = project(x, parts)
        for ours, part in zip(together, parts):
            assert max_rel_error(ours, part(x)) < 1e-6
        for dtype in (torch.float32, torch.bfloat16):
            stacked = fused_module._fp8_dequantized(parts, x.to(dtype))
            assert torch.equal(stacked, torch.cat([part.dequantized_weight(dtype) for part in parts]))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 input: dequantised in float32, multiplied in bf16
            stacked = fused_module._fp8_dequantized(parts, x)
            assert stacked.dtype == torch.bfloat16
            float32 = torch.cat([part.dequantized_weight(torch.float32) for part in parts])
            assert torch.equal(stacked, float32.bfloat16())
            for ours, part in zip(project(x, parts), parts):
                assert ours.dtype == torch.bfloat16 and max_rel_error(ours, part(x)) < 1e-2  # bf16 GEMMs of two shapes
    fused = forward(model, inputs)
    with monkeypatch.context() as patch:
        patch.setattr(fused_module, "path_of", lambda parts: PARTS)
        split = forward(model, inputs)
    assert max_rel_error(fused, split) < 1e-6
    for part in (p for group in groups(model) for p in group):
        part.compute = "scaled_mm"
    assert paths(model) == {PARTS}


def test_gguf_parts_run_one_by_one(inputs):
    model = tiny_model(TINY_CONFIGS[VARIANT])
    reference = forward(model, inputs)
    block = model.double_blocks[1]
    for name in block.projection_groups[0]:
        linear = getattr(block, name)
        gguf = GGUFLinear(linear.in_features, linear.out_features, type_id=0, bias_dtype=torch.float32)
        gguf.weight.data = linear.weight.detach().clone().view(torch.uint8)
        gguf.bias.data = linear.bias.detach().clone()
        setattr(block, name, gguf)
    with torch.inference_mode():
        assert path_of(block.group(0)) == PARTS and path_of(block.group(1)) == PLAIN
    assert max_rel_error(forward(model, inputs), reference) < 1e-6


def test_streamed_blocks_stay_packed(inputs):
    model = tiny_model(TINY_CONFIGS[VARIANT])
    reference = forward(model, inputs)
    seen: list[str] = []

    def record(block: nn.Module, args: tuple, output: object) -> None:  # runs before streaming's release
        seen.extend(path_of(block.group(i)) for i in range(len(block.projection_groups)))

    for block in [*model.double_blocks, *model.single_blocks]:
        block.register_forward_hook(record)
    streamer = BlockStreamer(model, torch.device("cpu"), budget_bytes=None)
    streamer.attach()
    try:
        with torch.inference_mode():
            streamed = model(**inputs)
    finally:
        streamer.detach()
    assert streamer.counts["load"] >= 3 and seen == [PLAIN] * 5  # 2 double blocks x 2 groups, 1 single block
    assert max_rel_error(streamed, reference) < 1e-6


def test_device_copies_keep_consecutive_tensors_as_views_of_one_span():
    storage = torch.arange(40.0)
    q, k, v = storage[:8].view(2, 4), storage[8:16].view(2, 4), storage[16:28].view(3, 4)
    lone, gap = torch.ones(3), storage[30:34]
    copies = copied([v, lone, q, gap, k], torch.clone)  # clone: a copy to another place, like .to(device)
    for original, copy in zip([v, lone, q, gap, k], copies):
        assert torch.equal(original, copy) and copy.data_ptr() != original.data_ptr()
    v2, _, q2, gap2, k2 = copies
    assert q2.untyped_storage().data_ptr() == k2.untyped_storage().data_ptr() == v2.untyped_storage().data_ptr()
    assert (q2.storage_offset(), k2.storage_offset(), v2.storage_offset()) == (0, 8, 16)
    assert gap2.untyped_storage().data_ptr() != q2.untyped_storage().data_ptr()  # not consecutive: its own copy


def test_a_loaded_file_is_packed(tmp_path):
    reference = tiny_dit()
    path = save(reference.state_dict(), tmp_path / "dit.safetensors")
    loaded = type(reference).from_single_file(path, TINY)
    assert paths(loaded) == {PLAIN}
    inputs = tiny_inputs()
    assert max_rel_error(run(loaded, inputs), run(reference, inputs)) < 1e-6


def test_pinned_blocks_keep_their_packed_rows_consecutive(inputs, monkeypatch):
    """The streamer's pinned buffer (here without CUDA: the packing, the page-locking left out) keeps each group's
    rows consecutive, and the device copy of the block (here a copy on the CPU) copies them as one span."""
    model = tiny_model(TINY_CONFIGS[VARIANT])
    reference = forward(model, inputs)
    monkeypatch.setattr(streaming, "pack", lambda tensors, pin: pin_pack(tensors, pin=False))
    streamer = BlockStreamer(model, torch.device("cpu"))
    for block in streamer._streamed:
        block.refresh()
        block.pin()
    assert paths(model) == {PLAIN}  # the blocks now run from their pinned buffers
    block = streamer._streamed[0]
    hosts = [slot.host.data_ptr() for slot in block.slots]
    block.copy_in(torch.device("cpu"), None)
    assert len(block.on_device) == len(block.slots)
    block.activate()
    assert paths(model) == {PLAIN}
    block.release()
    assert [slot.current().data_ptr() for slot in block.slots] == hosts
    assert max_rel_error(forward(model, inputs), reference) < 1e-6
