"""The memory plan of the DiT's weight formats (GGUF files and types, FP8) and of LoRAs; `hyimage plan`'s options.

Full-size figures are counted on meta and checked against formulas written here with the `gguf` package's block
sizes; tiny GGUF and LoRA files are checked against the bytes of the model they load into, block by block.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from safetensors.torch import save_file
from torch import nn

from benchmarks.memsim import LiveBytes, build_dit, simulate_dit
from hyimage.cli import main
from hyimage.lora.mixin import LoraMixin
from hyimage.models import HYImageDiffusionTransformer
from hyimage.offload import MemoryManager
from hyimage.offload.activations import dit_activation_bytes, dit_tokens, format_activation_bytes
from hyimage.offload.dit_weights import GGUF_DEQUANT_BYTES, GGUF_KEPT, dit_on_meta
from hyimage.offload.planner import make_plan
from hyimage.offload.request import PlanRequest, base_dit_weights, dit_config, lora_layout
from hyimage.offload.streaming import BlockStreamer
from hyimage.offload.weights import GIB, module_part
from hyimage.quantization.gguf import GGML_TYPES, GGUFLinear
from tests.fixtures.gguf_files import CONFIG, H, write_gguf

DISTILLED = "hunyuanimage-v2.1-distilled"


def gguf_bytes_by_hand(variant: str, qtype: T) -> int:
    """The DiT as ComfyUI-GGUF's tools write it at `qtype`, loaded by hyimage: linears outside GGUF_KEPT with rows
    of whole blocks and more than 1024 weights take GGML_QUANT_SIZES' bytes per block, every other tensor bf16."""
    block, size = GGML_QUANT_SIZES[qtype]
    model = build_dit(dit_config(PlanRequest(variant=variant)), fp8=False)
    total = 0
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            quantised = (
                type(module) is nn.Linear and param_name == "weight" and not name.startswith(GGUF_KEPT)
                and param.shape[1] % block == 0 and param.numel() > 1024
            )
            total += param.numel() // block * size if quantised else param.numel() * 2
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def test_block_sizes_are_the_gguf_packages() -> None:
    for _, (name, block, size) in GGML_TYPES.items():
        assert GGML_QUANT_SIZES[T[name]] == (block, size), name


def test_full_size_dit_in_each_format() -> None:
    """distilled DiT: bf16 2 x 17.45e9 parameters; Q4_K 144 bytes per 256 weights of its quantised linears, Q8_0
    34 per 32, the rest bf16: about 10 and 18 GB."""
    params = sum(p.numel() for p in build_dit(dit_config(PlanRequest(variant=DISTILLED)), fp8=False).parameters())
    bf16 = base_dit_weights(PlanRequest(variant=DISTILLED)).part.total
    assert bf16 == 2 * params
    fp8 = base_dit_weights(PlanRequest(variant=DISTILLED, fp8=True)).part.total
    assert 0.5 * bf16 < fp8 < 0.52 * bf16  # one byte per linear weight, their scales, the rest bf16
    q4 = base_dit_weights(PlanRequest(variant=DISTILLED, gguf="Q4_K")).part.total
    q8 = base_dit_weights(PlanRequest(variant=DISTILLED, gguf="Q8_0")).part.total
    assert q4 == gguf_bytes_by_hand(DISTILLED, T.Q4_K) and 10.0e9 < q4 < 11.0e9
    assert q8 == gguf_bytes_by_hand(DISTILLED, T.Q8_0) and 18.5e9 < q8 < 19.5e9


@pytest.mark.parametrize("budget", [8, 12])
def test_a_gguf_dit_streams_its_quantised_blocks(budget: float) -> None:
    request = PlanRequest(variant=DISTILLED, gguf="Q4_K", refiner=False)
    stage = make_plan(request, budget).stage("dit")
    part = base_dit_weights(request).part
    assert stage.placement == "block" and 0 < stage.resident_blocks < stage.total_blocks == len(part.blocks)
    k = stage.resident_blocks
    assert stage.weights_gib * GIB == pytest.approx(part.rest + sum(part.blocks[:k]) + 2 * max(part.blocks[k:]))
    # the block streamer, given the plan's weight budget, keeps the same blocks of the quantised model on the GPU
    model = dit_on_meta(dit_config(request), gguf="Q4_K")
    streamer = BlockStreamer(model, torch.device("cuda"), int(stage.weight_budget_gib * GIB))
    assert len(streamer.plan.resident) == k
    assert streamer.plan.device_bytes == pytest.approx(stage.weights_gib * GIB)
    assert stage.predicted_peak_gib + make_plan(request, budget).margin_gib <= budget
    assert make_plan(replace(request, gguf=None), budget).stage("dit").resident_blocks < k


def test_dequantisation_temporaries_are_bounded() -> None:
    """LiveBytes' peak of one GGUFLinear forward per weight, against the planner's figure (at most 5% above)."""
    for type_id, (name, block, size) in GGML_TYPES.items():
        if name not in GGUF_DEQUANT_BYTES:
            continue
        layer = GGUFLinear(1024, 256, type_id, bias=False)
        layer.weight.data = torch.randint(0, 256, layer.weight.shape, dtype=torch.uint8)
        x = torch.zeros(1, 1024, dtype=torch.bfloat16)
        tracker = LiveBytes()
        with torch.no_grad(), tracker:
            layer(x)
        measured = tracker.peak["cpu"] / (1024 * 256)
        assert 0.95 * GGUF_DEQUANT_BYTES[name] <= measured <= GGUF_DEQUANT_BYTES[name], name


@pytest.mark.slow
def test_simulated_gguf_and_lora_activations_stay_within_the_plan() -> None:
    """Full-size blocks (1 double, 1 single) at 2K on fake CUDA tensors: Q4_K, and bf16 with a rank-64 LoRA on
    every block linear (weights exact, activations within the plan and above 80% of it)."""
    from hyimage.lora.keys import linear_layers
    from hyimage.offload.dit_weights import LoraLayout, dit_weights

    request = PlanRequest(variant=DISTILLED)
    config = replace(dit_config(request), mm_double_blocks_depth=1, mm_single_blocks_depth=1)
    tokens = dit_tokens(request)
    names = [n for n in linear_layers(dit_on_meta(config)) if n.startswith(("double_blocks.", "single_blocks."))]
    for gguf, rank in (("Q4_K", 0), (None, 64)):
        loras = (LoraLayout("all", tuple((n, rank) for n in names)),) if rank else ()
        weights = dit_weights(config, False, gguf, None, loras)
        planned = dit_activation_bytes(config, 1, *tokens, False) + format_activation_bytes(weights, config, 1,
                                                                                             sum(tokens))
        simulated = simulate_dit(config, fp8=False, batch=1, image_tokens=(64, 64), text_tokens=1000,
                                 glyph_tokens=128, gguf=gguf, lora_rank=rank)
        assert simulated["weights"] == pytest.approx(weights.part.total / GIB, rel=1e-9)
        assert 0.8 * planned / GIB < simulated["activations"] <= planned / GIB, (gguf, rank)


# Tiny files, counted exactly.
@pytest.fixture(scope="module")
def tiny() -> HYImageDiffusionTransformer:
    return HYImageDiffusionTransformer(**CONFIG.to_dict()).eval()


def tiny_request(**kwargs) -> PlanRequest:
    return PlanRequest(variant=DISTILLED, dit_config=CONFIG, refiner=False, width=64, height=64, **kwargs)


def test_a_gguf_file_counts_as_the_model_it_loads(tiny, tmp_path: Path) -> None:
    path = tmp_path / "tiny-Q4_K.gguf"
    write_gguf(tiny, path, [T.Q8_0, T.Q4_K, T.Q5_0, T.F16])
    loaded = HYImageDiffusionTransformer.from_single_file(path, CONFIG.to_dict(), dtype=torch.bfloat16)
    planned = base_dit_weights(tiny_request(dit_file=str(path)))
    assert planned.part == module_part(loaded)  # the rest and every block, to the byte
    assert planned.part.total < base_dit_weights(tiny_request()).part.total
    largest = max((m for m in loaded.modules() if isinstance(m, GGUFLinear)),
                  key=lambda m: GGUF_DEQUANT_BYTES[GGML_TYPES[m.type_id][0]] * m.in_features * m.out_features)
    assert planned.dequant_bytes == int(GGUF_DEQUANT_BYTES[GGML_TYPES[largest.type_id][0]] * largest.in_features
                                        * largest.out_features)


def kohya_lora(tiny: nn.Module, rank: int = 4) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA on a fused single-block linear, a double-block projection and the final layer."""
    g = torch.Generator().manual_seed(0)
    linear1_rows = 3 * H + tiny.single_blocks[0].linear1_mlp.out_features
    shapes = {
        "lora_unet_single_blocks_0_linear1": (H, linear1_rows),
        "lora_unet_double_blocks_0_img_attn_proj": (H, H),
        "lora_unet_final_layer_linear": (H, tiny.final_layer.linear.out_features),
    }
    state = {}
    for name, (inputs, outputs) in shapes.items():
        state[f"{name}.lora_down.weight"] = torch.randn(rank, inputs, generator=g) * 0.1
        state[f"{name}.lora_up.weight"] = torch.randn(outputs, rank, generator=g) * 0.1
        state[f"{name}.alpha"] = torch.tensor(2.0)
    return state


class Holder(LoraMixin):
    def __init__(self, dit: nn.Module, memory: MemoryManager) -> None:
        self.dit, self.memory = dit, memory


def test_a_lora_adds_its_adapters_bytes_and_auto_plans_again(tiny, tmp_path: Path) -> None:
    path = tmp_path / "style.safetensors"
    save_file(kohya_lora(tiny), path)
    request = tiny_request()
    layout = lora_layout(path, request)
    assert layout.name == "style" and len(layout.ranks) == 6  # linear1 splits into q, k, v and mlp
    without, with_lora = base_dit_weights(request).part, base_dit_weights(replace(request, loras=(layout,))).part

    dit = HYImageDiffusionTransformer(**CONFIG.to_dict(), dtype=torch.bfloat16).eval()
    memory = MemoryManager(mode="auto", gpu_budget_gb=1, request=request)
    holder = Holder(dit, memory)
    assert module_part(dit) == without
    before = memory.plan.stage("dit")
    holder.load_lora_weights(path, scale=0.5)
    assert module_part(dit) == with_lora  # A, B and the scale of each adapted layer, in its block
    assert [b - a for a, b in zip(without.blocks, with_lora.blocks)] == [
        b - a for a, b in zip(without.blocks, module_part(dit).blocks)
    ]
    assert memory.request.loras == (layout,)
    after = memory.plan.stage("dit")
    assert after.weights_gib * GIB == pytest.approx(with_lora.total) and after.weights_gib > before.weights_gib
    assert after.activations_gib > before.activations_gib
    holder.unload_lora_weights()
    assert memory.request.loras == () and memory.plan.stage("dit").weights_gib == before.weights_gib


# The command.
def test_plan_command_gguf_type_file_and_lora(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--gpu-gb", "12", "--ram-gb", "inf", "--variant", "distilled", "--gguf", "Q4_K",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["request"]["gguf"] == "Q4_K" and plan["dit_weights"]["format"] == "GGUF Q4_K, estimated"
    assert plan["dit_weights"]["bytes"] == gguf_bytes_by_hand(DISTILLED, T.Q4_K)
    assert next(s for s in plan["stages"] if s["stage"] == "dit")["placement"] == "block"

    gguf_file, lora, config = tmp_path / "tiny.gguf", tmp_path / "style.safetensors", tmp_path / "config.json"
    write_gguf(tiny, gguf_file, [T.Q8_0])
    save_file(kohya_lora(tiny), lora)
    config.write_text(json.dumps(CONFIG.to_dict()))
    common = ["plan", "--gpu-gb", "12", "--ram-gb", "inf", "--no-refiner", "--variant", "distilled", "--width", "64",
              "--height", "64", "--dit-config", str(config), "--dit-file", str(gguf_file)]
    assert main([*common, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["dit_weights"]
    assert main([*common, "--lora", f"{lora}:0.5", "--lora", str(lora), "--json"]) == 0
    with_loras = json.loads(capsys.readouterr().out)
    loaded = HYImageDiffusionTransformer.from_single_file(gguf_file, CONFIG.to_dict(), dtype=torch.bfloat16)
    assert plain["format"] == "GGUF file tiny.gguf" and plain["bytes"] == module_part(loaded).total
    layout = lora_layout(lora, tiny_request())
    layers = {m: loaded.get_submodule(m) for m, _ in layout.ranks}
    one = sum(r * (layers[m].in_features + layers[m].out_features) * 2 + 4 for m, r in layout.ranks)  # A, B, scale
    assert with_loras["dit_weights"]["bytes"] - plain["bytes"] == 2 * one
    assert [entry["name"] for entry in with_loras["request"]["loras"]] == ["style", "style"]
    assert main([*common, "--lora", str(lora)]) == 0
    assert "DiT weights (GGUF file tiny.gguf)" in capsys.readouterr().out

    assert main(["plan", "--gpu-gb", "12", "--gguf", "Q4_K", "--dit-file", str(gguf_file)]) == 1
    assert "--gguf estimates a GGUF DiT without a file, --dit-file counts a file" in capsys.readouterr().err
    assert main(["plan", "--gpu-gb", "12", "--dit-file", str(tmp_path / "absent.gguf")]) == 1
    assert f"--dit-file {tmp_path / 'absent.gguf'} does not exist" in capsys.readouterr().err


def test_from_pretrained_plans_its_dit_file(tiny, tmp_path: Path) -> None:
    from hyimage.diffusion.pipelines.loader import make_memory, plan_for

    path = tmp_path / "tiny-Q4_K.gguf"
    write_gguf(tiny, path, [T.Q4_K])
    memory = make_memory(None, None, 2, None)
    plan_for(memory, DISTILLED, False, False, None, CONFIG, path)  # as load_pipeline calls it with dit_file
    assert memory.request.dit_file == str(path)
    loaded = HYImageDiffusionTransformer.from_single_file(path, CONFIG.to_dict(), dtype=torch.bfloat16)
    assert memory.plan.stage("dit").weights_gib * GIB == pytest.approx(module_part(loaded).total)


def test_a_comfyui_fp8_file_counts_as_the_model_it_loads(tiny, tmp_path: Path) -> None:
    """A ComfyUI `*_fp8_e4m3fn_scaled` file (float8 block linears with `scale_weight`, bf16 elsewhere)."""
    from tests.fixtures.dit_layouts import fused_layout

    file = {"diffusion_model.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, tensor in fused_layout(tiny.state_dict()).items():
        if "blocks." in key and "individual" not in key and key.endswith(".weight") and tensor.ndim == 2:
            file[f"diffusion_model.{key}"] = tensor.to(torch.float8_e4m3fn)
            file[f"diffusion_model.{key[: -len('weight')]}scale_weight"] = torch.ones(1)
        else:
            file[f"diffusion_model.{key}"] = tensor.to(torch.bfloat16)
    path = tmp_path / "tiny_fp8_e4m3fn_scaled.safetensors"
    save_file(file, str(path))
    loaded = HYImageDiffusionTransformer.from_single_file(path, CONFIG.to_dict(), dtype=torch.bfloat16)
    planned = base_dit_weights(tiny_request(dit_file=str(path)))
    assert planned.fp8 and planned.part == module_part(loaded)
    assert planned.part.total < base_dit_weights(tiny_request()).part.total


def test_a_refiner_lora_is_planned_with_the_refiner_dit() -> None:
    """A LoRA on the refiner's DiT (patch 1x2x2: the refiner stage) adds its adapters to that stage's weights,
    rank x (in + out) bf16 values plus a float32 scale per adapted layer, and leaves the base DiT's GPU plan alone
    (its host figure holds the refiner DiT, adapters included)."""
    from hyimage.models.dit.configs import resolve_dit_config
    from tests.fixtures.tiny_tree import TINY_REFINER

    hidden, rank = TINY_REFINER["hidden_size"], 4
    refiner = HYImageDiffusionTransformer(**TINY_REFINER, dtype=torch.bfloat16).eval()
    state = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(rank, hidden),
             "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(hidden, rank),
             "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(2.0)}
    request = PlanRequest(fp8=True, refiner=True)
    memory = MemoryManager(mode="auto", gpu_budget_gb=24, request=request)  # the refiner DiT whole on the GPU
    holder = Holder(refiner, memory)
    before = memory.plan
    holder.load_lora_weights(state)
    assert memory.request.loras == () and len(memory.request.refiner_loras) == 1
    after = memory.plan
    full = resolve_dit_config("hunyuanimage-refiner").hidden_size  # the released refiner's projection: full x full
    added = (after.stage("refiner_dit").weights_gib - before.stage("refiner_dit").weights_gib) * GIB
    assert after.stage("refiner_dit").placement == before.stage("refiner_dit").placement == "model"
    assert added == pytest.approx(rank * (full + full) * 2 + 4, abs=16)
    assert after.stage("refiner_dit").activations_gib > before.stage("refiner_dit").activations_gib
    gpu = ("placement", "predicted_peak_gib", "weights_gib", "activations_gib")
    assert [getattr(after.stage("dit"), k) for k in gpu] == [getattr(before.stage("dit"), k) for k in gpu]
    holder.unload_lora_weights()
    assert memory.request.refiner_loras == () and memory.plan.stage("refiner_dit") == before.stage("refiner_dit")
