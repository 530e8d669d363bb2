"""The memory planner, `hyimage plan`, memory_mode="auto", and the full-size simulator that checks them.

Full-size DiT checks run the real code on fake CUDA tensors (benchmarks/memsim.py) with 1 double and 1 single
block at full width and full token count: activations are per-block transients, so they do not grow with
depth; the weights the full model keeps on the GPU are counted exactly on its meta build by the block streamer
itself. Simulated peak of the full stage = those weights + the simulated activation peak.
"""

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from benchmarks.memsim import LiveBytes, fake_cuda, simulate_dit, simulate_text_encoder, simulate_vae_decode
from hyimage.cli import main
from hyimage.models.dit.configs import DiTConfig
from hyimage.offload import MemoryManager
from hyimage.offload.activations import TEMPLATE_TOKENS, TEXT_TOKENS, dit_activation_bytes, dit_tokens
from hyimage.offload.needs import QWEN25VL_7B, QWEN25VL_32B, TEXT_ENCODER_LAYERS
from hyimage.offload.planner import make_plan, margin_gib
from hyimage.offload.request import PlanRequest, dit_config
from hyimage.offload.streaming import BlockStreamer, DeviceCopy
from hyimage.offload.weights import GIB, language_model

BUDGETS = (24, 16, 12, 8)
DISTILLED_FP8 = PlanRequest(fp8=True, refiner=True)


def test_plan_cli_prints_stages_as_json(capsys: pytest.CaptureFixture) -> None:
    argv = ["plan", "--gpu-gb", "12", "--ram-gb", "32", "--variant", "distilled", "--fp8", "--refiner",
            "--width", "2560", "--height", "1536", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s for s in plan["stages"]}
    assert list(stages) == ["text_encoder", "glyph_encoder", "dit", "vae_decode", "refiner_dit", "refiner_vae"]
    assert all({"stage", "placement", "predicted_peak_gib"} <= set(s) for s in plan["stages"])
    assert stages["dit"]["placement"] == "block" and 0 < stages["dit"]["resident_blocks"] < 60
    assert main(["plan", "--gpu-gb", "8", "--ram-gb", "inf", "--reprompt", "32b"]) == 1  # a refused stage
    text = capsys.readouterr().out
    assert "reprompt" in text and "refused" in text and "exact 512px gpu" in text and "--reprompt 7b" in text


@pytest.mark.parametrize("budget", (*BUDGETS, 6))
def test_every_planned_stage_fits_its_budget_with_the_margin(budget: float) -> None:
    plan = make_plan(DISTILLED_FP8, budget, 32)
    for stage in plan.stages:
        if stage.placement == "refused":
            assert "needs" in stage.reason and stage.predicted_peak_gib + plan.margin_gib > budget
        else:
            assert stage.predicted_peak_gib + plan.margin_gib <= budget, stage
    placements = {s.stage: s.placement for s in plan.stages}
    assert placements["dit"] != "refused"  # the DiT streams down to 6 GiB
    # the whole decodes need 8.7 and 9.5 GiB + margin; below, the VAEs decode exactly over tiles
    assert placements["vae_decode"] == placements["refiner_vae"] == ("model" if budget >= 12 else "exact")


def test_24_gib_streams_nothing_and_base_cfg_fits_24_and_16_with_fp8() -> None:
    plan = make_plan(DISTILLED_FP8, 24)
    assert {s.placement for s in plan.stages} == {"model"}
    base = PlanRequest(variant="hunyuanimage-v2.1", fp8=True, refiner=False)
    assert make_plan(base, 24).stage("dit").placement == "model"
    assert make_plan(base, 16).stage("dit").placement == "block"
    assert make_plan(PlanRequest(refiner=False), 80).stage("dit").placement == "resident"
    with_reprompt = make_plan(PlanRequest(refiner=False, reprompt="7b"), 80)
    resident, reprompt = with_reprompt.stage("dit"), with_reprompt.stage("reprompt")
    assert resident.placement == "resident" and reprompt.placement == "model"
    assert reprompt.weights_gib > resident.weights_gib and reprompt.predicted_peak_gib + with_reprompt.margin_gib <= 80
    assert make_plan(DISTILLED_FP8, 24, 32).stage("refiner_dit").host_released == ["dit"]  # host: see test_host_plan


@pytest.mark.slow
def test_language_model_sizes_and_text_activations() -> None:
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    assert TEXT_ENCODER_LAYERS == 26  # the encoder builds all decoder layers but the last two
    for config in (QWEN25VL_7B, QWEN25VL_32B):
        layers = 2
        with torch.device("meta"):
            model = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
                hidden_size=config["hidden"], intermediate_size=config["intermediate"], num_hidden_layers=layers,
                num_attention_heads=config["heads"], num_key_value_heads=config["kv_heads"],
                vocab_size=config["vocab"]))
        counted = sum(p.numel() for p in model.parameters()) * 2
        assert language_model(config, layers, lm_head=False).total == counted
    # and the text encoder's simulated activations (one decoder layer, a padded 2K prompt) stay within the plan
    simulated = simulate_text_encoder(TEXT_TOKENS + TEMPLATE_TOKENS)["activations"]
    planned = make_plan(DISTILLED_FP8, 24).stage("text_encoder").activations_gib
    assert 0.05 < simulated <= planned


def test_auto_mode_places_each_part_as_the_plan_says() -> None:
    small = DiTConfig(patch_size=(1, 1), in_channels=4, hidden_size=64, heads_num=2, mm_double_blocks_depth=1,
                      mm_single_blocks_depth=1, rope_dim_list=(16, 16), text_states_dim=32)
    from hyimage.models.dit.model import HYImageDiffusionTransformer

    with torch.device("meta"):
        dit = HYImageDiffusionTransformer(**small.to_dict())
    memory = MemoryManager("cuda", "auto", gpu_budget_gb=12, request=DISTILLED_FP8)
    stage = memory.plan.stage("dit")
    assert memory.placement(dit) == ("block", stage.weight_budget_gib)
    import hyimage.models as models

    vae = models.HunyuanVAE2D.__new__(models.HunyuanVAE2D)
    memory = MemoryManager("cuda", "auto", gpu_budget_gb=8, request=DISTILLED_FP8)
    assert memory.placement(vae) == ("model", None) and memory.exact_tiling(vae).tile_size == 512
    memory = MemoryManager("cuda", "auto", gpu_budget_gb=2.5, request=DISTILLED_FP8)
    with pytest.raises(MemoryError, match="(?s)vae_decode.*ways out.*gpu_budget_gb=.*hyimage plan"):
        memory.placement(vae)
    assert MemoryManager("cpu", "auto").placement(dit) == ("none", None)


def test_moves_are_keyed_by_the_parameter() -> None:
    """Each `param.data` is a new temporary; keyed by its id, a freed id was reused and a weight of another
    shape attached to the wrong layer (the case: a [10752, 3584] weight on a LayerNorm)."""
    with fake_cuda():
        model = nn.Sequential(*[nn.Sequential(nn.LayerNorm(8 + i), nn.Linear(8 + i, 9 + i)) for i in range(20)])
        model.requires_grad_(False)
        shapes = {name: p.shape for name, p in model.named_parameters()}
        copy = DeviceCopy(model, torch.device("cuda"), torch.device("cpu"))
        copy.attach()
        assert {name: p.shape for name, p in model.named_parameters()} == shapes
        assert {p.device.type for p in model.parameters()} == {"cuda"}
        copy.detach()


@pytest.mark.slow
def test_simulator_matches_a_real_cpu_run() -> None:
    """The same tracker on real CPU tensors and on fake CUDA tensors (float32, no autocast): same peak."""
    config = DiTConfig(patch_size=(1, 1), in_channels=16, hidden_size=256, heads_num=4, mm_double_blocks_depth=1,
                       mm_single_blocks_depth=1, rope_dim_list=(32, 32), text_states_dim=128, glyph_byT5_v2=True,
                       guidance_embed=True, use_meanflow=True)
    shape = dict(fp8=False, batch=2, image_tokens=(16, 16), text_tokens=100, glyph_tokens=32)
    real = simulate_dit(config, device="cpu", **shape)
    simulated = simulate_dit(config, device="cuda", dtype=torch.float32, **shape)
    assert real["activations"] > 0.01  # GiB: the check is not lost in rounding
    assert simulated["activations"] == pytest.approx(real["activations"], rel=0.03)
    # and the tracker counts what it should: a float32 (1000, 1000) matrix and its product
    tracker = LiveBytes()
    with tracker:
        a = torch.ones(1000, 1000)
        b = a @ a
        del a, b
    assert tracker.peak["cpu"] == 2 * 4 * 1000 * 1000 and tracker.gib("cpu", "current") == 0


def _full_dit_weights(request: PlanRequest, placement, weight_budget_gib) -> float:
    """GiB of the full DiT that the memory manager keeps on the GPU for this placement (counted on meta)."""
    from benchmarks.memsim import build_dit

    dit = build_dit(dit_config(request), request.fp8)
    if placement == "model":
        return sum(t.numel() * t.element_size() for t in (*dit.parameters(), *dit.buffers())) / GIB
    streamer = BlockStreamer(dit, torch.device("cuda"), int(weight_budget_gib * GIB))
    return streamer.plan.device_bytes / GIB


@pytest.mark.slow
@pytest.mark.parametrize("width, height", [(2048, 2048), (2560, 1536)])
def test_simulated_dit_peak_stays_within_the_plan(width: int, height: int) -> None:
    request = replace(DISTILLED_FP8, width=width, height=height)
    config = replace(dit_config(request), mm_double_blocks_depth=1, mm_single_blocks_depth=1)
    image, text = dit_tokens(request)
    grid = (height // 32, width // 32)
    simulated = simulate_dit(config, fp8=True, batch=1, image_tokens=grid, text_tokens=1000, glyph_tokens=128)
    predicted_activations = dit_activation_bytes(config, 1, image, text, True) / GIB
    assert 0.8 * predicted_activations < simulated["activations"] <= predicted_activations
    for budget in BUDGETS:
        stage = make_plan(request, budget).stage("dit")
        weights = _full_dit_weights(request, stage.placement, stage.weight_budget_gib)
        peak = weights + simulated["activations"]
        assert peak <= stage.predicted_peak_gib + 1e-6, (budget, peak, stage)
        assert peak + margin_gib(budget) <= budget


@pytest.mark.slow
def test_simulated_vae_decode_stays_within_the_plan() -> None:
    simulated = simulate_vae_decode("vae_decode", 2048, 2048)
    stage = make_plan(DISTILLED_FP8, 24).stage("vae_decode")
    assert stage.weights_gib == pytest.approx(simulated["weights"], rel=1e-3)
    assert 0.8 * stage.activations_gib < simulated["activations"] <= stage.activations_gib


def test_from_pretrained_defaults_to_auto_with_its_budgets() -> None:
    from hyimage.diffusion.pipelines.loader import make_memory, plan_for

    memory = make_memory(None, None, 12, 32)
    assert (memory.mode, memory.gpu_budget_gb, memory.host_budget_gb) == ("auto", 12, 32)
    plan_for(memory, "hunyuanimage-v2.1", True, False, "7b", "hunyuanimage-v2.1")
    assert memory.request == PlanRequest(variant="hunyuanimage-v2.1", fp8=True, refiner=False, reprompt="7b")
    assert [s.stage for s in memory.plan.stages][:2] == ["reprompt", "text_encoder"]
    assert make_memory("cpu", "block", 4).mode == "block"
