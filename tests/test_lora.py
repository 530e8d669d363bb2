"""LoRA on the DiT: the kohya sd-scripts, ComfyUI and diffusers/PEFT key layouts against weights merged by hand."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hyimage.lora import LoraMixin
from hyimage.lora.layers import BANK
from hyimage.offload import MemoryManager
from hyimage.offload.streaming import BlockStreamer
from hyimage.quantization.fp8 import FP8Linear, convert_to_fp8_linear, fp8_linear_modules
from tests.fixtures.dit_loading import TINY, run, tiny_dit, tiny_inputs
from tests.fixtures.numerics import max_rel_error

H, MLP = TINY["hidden_size"], TINY["hidden_size"] * TINY["mlp_width_ratio"]
EXACT = 1e-5


def q_k_v(prefix: str, names=("q", "k", "v")) -> list[tuple[str, int, int]]:
    """Row pieces of a fused q|k|v module: (our module, first row, end row)."""
    return [(f"{prefix}{n}", i * H, (i + 1) * H) for i, n in enumerate(names)]


LINEAR1 = [*q_k_v("single_blocks.0.linear1_"), ("single_blocks.0.linear1_mlp", 3 * H, 3 * H + MLP)]

# Each format: (LoRA module name as the tool writes it, [(our module, first row, end row, first row in ours)], in).
# Written out by hand from the tools' naming (see the module docstring of hyimage.lora.keys).
FORMATS = {
    "kohya": (
        [
            (
                "lora_unet_double_blocks_0_img_attn_qkv",
                [(m, s, e, 0) for m, s, e in q_k_v("double_blocks.0.img_attn_")],
                H,
            ),
            ("lora_unet_double_blocks_1_txt_mlp_fc1", [("double_blocks.1.txt_mlp.fc1", 0, MLP, 0)], H),
            ("lora_unet_double_blocks_0_img_mod_linear", [("double_blocks.0.img_mod.linear", 0, 6 * H, 0)], H),
            ("lora_unet_single_blocks_0_linear1", [(m, s, e, 0) for m, s, e in LINEAR1], H),
            ("lora_unet_single_blocks_1_linear2", [("single_blocks.1.linear2.fc", 0, H, 0)], H + MLP),
            ("lora_unet_single_blocks_1_modulation_linear", [("single_blocks.1.modulation.linear", 0, 3 * H, 0)], H),
        ],
        ".lora_down.weight",
        ".lora_up.weight",
    ),
    "comfyui": (
        [
            (
                "diffusion_model.double_blocks.1.txt_attn.qkv",
                [(m, s, e, 0) for m, s, e in q_k_v("double_blocks.1.txt_attn_")],
                H,
            ),
            ("diffusion_model.double_blocks.0.img_mlp.2", [("double_blocks.0.img_mlp.fc2", 0, H, 0)], MLP),
            ("diffusion_model.double_blocks.1.img_attn.proj", [("double_blocks.1.img_attn_proj", 0, H, 0)], H),
            ("diffusion_model.single_blocks.0.linear1", [(m, s, e, 0) for m, s, e in LINEAR1], H),
            ("diffusion_model.single_blocks.0.modulation.lin", [("single_blocks.0.modulation.linear", 0, 3 * H, 0)], H),
            ("lora_unet_double_blocks_1_img_mlp_0", [("double_blocks.1.img_mlp.fc1", 0, MLP, 0)], H),
            ("lora_unet_double_blocks_0_txt_mod_lin", [("double_blocks.0.txt_mod.linear", 0, 6 * H, 0)], H),
        ],
        ".lora_down.weight",
        ".lora_up.weight",
    ),
    "diffusers": (
        [
            ("transformer.transformer_blocks.0.attn.to_q", [("double_blocks.0.img_attn_q", 0, H, 0)], H),
            ("transformer.transformer_blocks.1.attn.add_v_proj", [("double_blocks.1.txt_attn_v", 0, H, 0)], H),
            ("transformer.transformer_blocks.0.ff.net.0.proj", [("double_blocks.0.img_mlp.fc1", 0, MLP, 0)], H),
            ("transformer.single_transformer_blocks.1.proj_mlp", [("single_blocks.1.linear1_mlp", 0, MLP, 0)], H),
            ("transformer.single_transformer_blocks.0.proj_out", [("single_blocks.0.linear2.fc", 0, H, 0)], H + MLP),
            (
                "transformer.context_embedder.token_refiner.refiner_blocks.1.attn.to_k",
                [("txt_in.individual_token_refiner.blocks.1.self_attn_qkv", 0, H, H)],
                H,
            ),
            (  # diffusers holds (scale, shift), the model (shift, scale)
                "transformer.norm_out.linear",
                [("final_layer.adaLN_modulation.1", 0, H, H), ("final_layer.adaLN_modulation.1", H, 2 * H, 0)],
                H,
            ),
        ],
        ".lora_A.weight",
        ".lora_B.weight",
    ),
}


def make_lora(fmt: str, seed: int = 0, rank: int = 4, alpha: float | None = 2.0) -> dict[str, torch.Tensor]:
    modules, down_suffix, up_suffix = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, routes, inputs in modules:
        rows = sum(end - start for _, start, end, _ in routes)
        state[name + down_suffix] = torch.randn(rank, inputs, generator=g) * 0.3
        state[name + up_suffix] = torch.randn(rows, rank, generator=g) * 0.3
        if alpha is not None and fmt != "diffusers":
            state[name + ".alpha"] = torch.tensor(alpha)
    return state


def merged_by_hand(model: nn.Module, fmt: str, lora: dict, scale: float, alpha: float | None = None) -> nn.Module:
    """A dense copy of `model` with W + scale * alpha / rank * B @ A added, row piece by row piece (alpha: the
    file's `.alpha`, else `alpha`, else the rank)."""
    modules, down_suffix, up_suffix = FORMATS[fmt]
    merged = copy.deepcopy(model)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for name, routes, _ in modules:
            down, up = lora[name + down_suffix], lora[name + up_suffix]
            module_alpha = float(lora.get(name + ".alpha", alpha if alpha is not None else down.shape[0]))
            delta = scale * module_alpha / down.shape[0] * (up @ down)
            for module, start, end, dst in routes:
                params[module + ".weight"][dst : dst + end - start] += delta[start:end]
    return merged


class Holder(LoraMixin):
    """The mixin on a bare object with a DiT and a memory manager (what the pipelines give it)."""

    def __init__(self, dit: nn.Module) -> None:
        self.dit = dit
        self.memory = MemoryManager()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_dit()


@pytest.fixture(scope="module")
def inputs() -> dict:
    return tiny_inputs()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_equals_the_weights_merged_by_hand(model, inputs, fmt, tmp_path: Path) -> None:
    lora = make_lora(fmt)
    path = tmp_path / f"{fmt}.safetensors"
    # diffusers keeps PEFT's LoraConfig (r, lora_alpha) in the safetensors metadata, not in the tensors
    peft_config = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 6.0})} if fmt == "diffusers" else None
    save_file(lora, str(path), metadata=peft_config)
    holder = Holder(copy.deepcopy(model))
    name = holder.load_lora_weights(path, scale=0.7)
    assert name == fmt
    assert list(holder.dit.state_dict()) == list(model.state_dict())  # adapters are not saved with the model
    expected = run(merged_by_hand(model, fmt, lora, 0.7, alpha=6.0 if fmt == "diffusers" else None), inputs)
    assert max_rel_error(run(holder.dit, inputs), expected) <= EXACT
    assert max_rel_error(run(model, inputs), expected) > 1e-3  # the LoRA does change the output


def test_two_adapters_scales_and_unload(model, inputs) -> None:
    holder = Holder(copy.deepcopy(model))
    before = run(holder.dit, inputs)
    kohya, diffusers = make_lora("kohya", seed=1), make_lora("diffusers", seed=2)
    holder.load_lora_weights(kohya, adapter_name="style", scale=0.5)
    holder.load_lora_weights(diffusers, adapter_name="subject", scale=1.5)
    both = merged_by_hand(merged_by_hand(model, "kohya", kohya, 0.5), "diffusers", diffusers, 1.5)
    assert max_rel_error(run(holder.dit, inputs), run(both, inputs)) <= EXACT

    holder.set_adapters(["style", "subject"], [1.0, -0.25])
    both = merged_by_hand(merged_by_hand(model, "kohya", kohya, 1.0), "diffusers", diffusers, -0.25)
    assert max_rel_error(run(holder.dit, inputs), run(both, inputs)) <= EXACT

    holder.set_adapters("subject")  # only this one, scale 1
    assert (
        max_rel_error(run(holder.dit, inputs), run(merged_by_hand(model, "diffusers", diffusers, 1.0), inputs)) <= EXACT
    )
    assert holder.get_list_adapters() == ["style", "subject"]

    holder.unload_lora_weights()
    assert torch.equal(run(holder.dit, inputs), before)
    assert not any(name.endswith("." + BANK) for name, _ in holder.dit.named_modules())
    assert all(not layer._forward_hooks for layer in holder.dit.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_then_unfuse_gives_back_the_weights_bit_for_bit(model, inputs, dtype) -> None:
    holder = Holder(copy.deepcopy(model).to(dtype))
    original = {k: v.clone() for k, v in holder.dit.state_dict().items()}
    holder.load_lora_weights(make_lora("comfyui"), scale=0.8)
    side_branch = run(holder.dit, {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()})
    holder.fuse_lora()
    changed = [k for k, v in holder.dit.state_dict().items() if not torch.equal(v, original[k])]
    assert changed and all(".weight" in k for k in changed)
    fused = run(holder.dit, {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()})
    bound = EXACT if dtype == torch.float32 else 0.05
    assert max_rel_error(fused, side_branch) <= bound  # the side branch is off while fused
    with pytest.raises(ValueError, match="unfuse_lora"):
        holder.set_adapters("adapter", 0.3)
    holder.unfuse_lora()
    assert all(torch.equal(v, original[k]) for k, v in holder.dit.state_dict().items())
    assert torch.equal(
        run(holder.dit, {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}), side_branch
    )


def test_fp8_base_side_branch_and_requantised_fuse(model, inputs) -> None:
    fp8 = copy.deepcopy(model)
    convert_to_fp8_linear(fp8, fp8_linear_modules(fp8))
    dequantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in fp8.named_modules():
            if isinstance(layer, FP8Linear):
                dequantized.get_submodule(name).weight.copy_(layer.weight.float() * layer.weight_scale)
    lora = make_lora("kohya", seed=3)
    holder = Holder(fp8)
    holder.load_lora_weights(lora, scale=0.6)
    assert all(layer.weight.dtype == torch.float8_e4m3fn for layer in fp8.modules() if isinstance(layer, FP8Linear))
    expected = run(merged_by_hand(dequantized, "kohya", lora, 0.6), inputs)
    assert max_rel_error(run(fp8, inputs), expected) <= EXACT  # the branch adds exactly to the FP8 layer
    weights = {k: v.clone() for k, v in fp8.state_dict().items()}
    holder.fuse_lora()
    # requantising W + delta to e4m3 (3 mantissa bits): each weight within 2^-4 relative, as in test_fp8
    assert max_rel_error(run(fp8, inputs), expected) <= 0.1
    holder.unfuse_lora()
    assert all(torch.equal(v, weights[k]) for k, v in fp8.state_dict().items())


def test_unmatched_keys_are_named_unless_not_strict(model, inputs) -> None:
    lora = make_lora("kohya")
    lora["lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight"] = torch.zeros(4, H)
    lora["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(H, 4)
    holder = Holder(copy.deepcopy(model))
    with pytest.raises(ValueError, match="lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight"):
        holder.load_lora_weights(lora)
    assert not holder.get_list_adapters()
    holder.load_lora_weights(lora, strict=False)
    expected = run(merged_by_hand(model, "kohya", make_lora("kohya"), 1.0), inputs)
    assert max_rel_error(run(holder.dit, inputs), expected) <= EXACT
    wrong = make_lora("kohya")
    wrong["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.zeros(2 * H, 4)
    with pytest.raises(ValueError, match="output rows"):
        Holder(copy.deepcopy(model)).load_lora_weights(wrong)


def test_adapters_stream_with_their_blocks(model, inputs) -> None:
    holder = Holder(copy.deepcopy(model))
    holder.load_lora_weights(make_lora("kohya"), scale=0.7)
    streamer = BlockStreamer(holder.dit, torch.device("cpu"), budget_bytes=None)
    streamed = {slot.name for block in streamer._streamed for slot in block.slots}
    assert {"adapter_down", "adapter_up", "adapter_scale"} <= streamed
    expected = run(holder.dit, inputs)
    streamer.attach()
    try:
        assert torch.equal(run(holder.dit, inputs), expected)
    finally:
        streamer.detach()
    assert streamer.counts["load"] == len(streamer.plan.streamed)


@pytest.mark.slow
def test_a_scale_change_does_not_recompile() -> None:
    layer = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8))
    model = nn.Module()
    model.config = type("Config", (), {"hidden_size": 16})()
    model.double_blocks, model.single_blocks, model.net = nn.ModuleList(), nn.ModuleList(), layer
    holder = Holder(model)
    g = torch.Generator().manual_seed(0)
    holder.load_lora_weights(
        {"net.2.lora_A.weight": torch.randn(2, 16, generator=g), "net.2.lora_B.weight": torch.randn(8, 2, generator=g)},
        adapter_name="a",
    )
    compiled_graphs = []

    def backend(graph, example_inputs):
        compiled_graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend)
    x = torch.randn(3, 16, generator=g)
    first = compiled(x)
    holder.set_adapters("a", 0.25)
    second = compiled(x)
    assert len(compiled_graphs) == 1
    assert torch.allclose(second, layer(x)) and not torch.allclose(first, second)


def test_cli_lora_argument(tmp_path: Path, capsys) -> None:
    from hyimage.cli import main
    from hyimage.lora.mixin import parse_lora_spec

    assert parse_lora_spec("style.safetensors") == (Path("style.safetensors"), 1.0)
    assert parse_lora_spec("C:/loras/style.safetensors:0.6") == (Path("C:/loras/style.safetensors"), 0.6)
    missing = tmp_path / "absent.safetensors"
    args = [
        "generate",
        "a fox",
        "--model-root",
        str(tmp_path),
        "--lora",
        f"{missing}:0.5",
        "-o",
        str(tmp_path / "x.png"),
    ]
    assert main(args) == 1
    assert f"--lora {missing} does not exist" in capsys.readouterr().err
