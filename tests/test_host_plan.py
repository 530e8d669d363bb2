"""Host RAM planned: parts released between stages within `host_budget_gb`, and read again when next needed.

Full size: the planner alone (nothing loaded). Tiny tree: through `from_pretrained` on the CPU, a host budget that
forces releases makes the pipeline drop the parts the plan releases (no object of theirs left alive) and build them
again on the next call, with the same images as without a budget.
"""

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from hyimage import HunyuanImagePipeline
from hyimage.cli import main
from hyimage.offload.host_plan import HOST_BASE_CPU_GIB
from hyimage.offload.planner import make_plan
from hyimage.offload.request import PlanRequest
from hyimage.offload.weights import GIB
from tests.fixtures.qwen_tokenizer import build_qwen_tokenizer_once
from tests.fixtures.tiny_tree import write_tiny_tree

REFINER_2K_FP8 = PlanRequest(fp8=True, refiner=True)


@pytest.mark.parametrize("gpu", (24, 16, 12, 8, 6))
def test_2k_refiner_call_fits_a_32_gib_host(gpu: float) -> None:
    plan = make_plan(REFINER_2K_FP8, gpu, 32)
    for stage in plan.stages:
        assert stage.stage in stage.host_held and stage.host_gib <= 32, stage
    assert "text_encoder" in plan.stage("dit").host_released  # the text encoder goes before the DiT is read
    assert "dit" in plan.stage("refiner_dit").host_released  # and the base DiT before the refiner DiT
    roomy = make_plan(REFINER_2K_FP8, gpu, 256)
    assert not any(s.host_released for s in roomy.stages) and roomy.stage("refiner_dit").host_gib > 32
    assert roomy.stage("refiner_dit").host_held == make_plan(REFINER_2K_FP8, gpu).stage("refiner_dit").host_held


def test_exact_vae_activations_in_host_memory_count_in_the_host_plan() -> None:
    """At 6 GiB the refiner VAE keeps its whole activations in pinned host memory: its stage's host peak holds them
    on top of the parts held, and parts are released to make room for them (at 26 GiB: the DiT)."""
    from hyimage.offload.activations import exact_vae_host_bytes
    from hyimage.offload.planner import host_bytes

    plan = make_plan(REFINER_2K_FP8, 6, 26)
    vae = plan.stage("refiner_vae")
    assert vae.placement == "exact" and vae.activations_on == "host"
    pinned = exact_vae_host_bytes("refiner_vae", REFINER_2K_FP8)
    sizes = host_bytes(REFINER_2K_FP8, {s.stage: s for s in plan.stages})
    assert sizes["refiner_vae"][2] == pinned > 1.5 * GIB
    held = sum(sizes[name][0] for name in vae.host_held)
    assert vae.host_gib * GIB == pytest.approx(2 * GIB + held + pinned)  # the process, the parts held, the activations
    assert vae.host_released and vae.host_gib <= 26


def test_32b_reprompt_is_refused_under_32_gib_with_the_way_out() -> None:
    plan = make_plan(PlanRequest(fp8=True, refiner=True, reprompt="32b"), 24, 32)
    reprompt = plan.stage("reprompt")
    assert reprompt.placement == "refused"
    assert "32 GiB host budget" in reprompt.reason and "7b" in reprompt.reason and "no reprompt" in reprompt.reason
    assert all(s.placement != "refused" and s.host_gib <= 32 for s in plan.stages if s.stage != "reprompt")
    with_7b = make_plan(PlanRequest(fp8=True, refiner=True, reprompt="7b"), 24, 32)
    assert all(s.placement != "refused" and s.host_gib <= 32 for s in with_7b.stages)
    large = make_plan(PlanRequest(fp8=True, refiner=True, reprompt="32b"), 24, 128)
    assert large.stage("reprompt").placement == "block" and 62 < large.stage("reprompt").host_gib <= 128


def test_plan_cli_shows_host_peaks_and_releases(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--gpu-gb", "12", "--ram-gb", "32", "--variant", "distilled", "--fp8", "--refiner",
                 "--reprompt", "32b", "--json"]) == 1  # the reprompt stage is refused
    plan = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s for s in plan["stages"]}
    assert stages["reprompt"]["placement"] == "refused" and "--reprompt 7b" in plan["ways_out"]
    assert stages["dit"]["host_released"] == ["text_encoder"] and 0 < stages["dit"]["host_gib"] <= 32
    assert main(["plan", "--gpu-gb", "12", "--ram-gb", "32", "--variant", "distilled", "--fp8", "--refiner"]) == 0
    assert "releases text_encoder" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_qwen_tokenizer_once(str(tmp_path_factory.getbasetemp()))
    return write_tiny_tree(tmp_path_factory.mktemp("ckpts"), tokenizer)


def _instances(cls_name: str) -> list:
    gc.collect()
    return [o for o in gc.get_objects() if type(o).__name__ == cls_name]


def _live(cls_name: str, others: list) -> int:
    """Live objects of the class, those in `others` (alive before the test: session fixtures' pipelines) left out."""
    return sum(not any(o is other for other in others) for o in _instances(cls_name))


@pytest.mark.slow
def test_tiny_tree_releases_and_reloads_parts_as_planned_with_the_same_images(tree: Path) -> None:
    before = {name: _instances(name) for name in ("MLLMTextEncoder", "Qwen2_5_VLTextModel")}  # kept: ids stay
    call = dict(prompt='a sign that reads "RAM"', width=64, height=64, num_inference_steps=1, seed=3,
                use_refiner=True, output_type="np")
    load = dict(model_root=tree, model_name="hunyuanimage-v2.1-distilled", use_fp8=True, reprompt_model=None,
                progress_bar=False)
    reference = HunyuanImagePipeline.from_pretrained(**load)(**call).images
    # room for the process and about half of the tiny parts (91 MB in all): releases are needed
    pipe = HunyuanImagePipeline.from_pretrained(**load, host_budget_gb=HOST_BASE_CPU_GIB + 48e6 / GIB)
    plan = pipe.memory.host_plan()
    released = {name for step in plan.values() for name in step.released}
    assert {"text_encoder", "dit"} <= released

    seen = []

    def in_the_loop(step: int, timestep: float, latents: torch.Tensor) -> None:
        built = set(pipe.memory.host.built())
        seen.append((built, *(_live(name, others) for name, others in before.items())))

    first = pipe(**call).images
    refs = {stage: weakref.ref(parts[0]) for stage, parts in pipe.memory.host.built().items()}
    assert set(refs) == set(plan["refiner_dit"].held)  # what the plan holds after the last stage built its part
    second = pipe(**call, callback=in_the_loop).images
    np.testing.assert_array_equal(first, reference)
    np.testing.assert_array_equal(second, reference)

    # in the DiT loop the text encoder is gone everywhere (both templates' wrappers and the language model)
    built, encoders, language_models = seen[0]
    assert built == set(plan["dit"].held) and "text_encoder" not in built
    assert encoders == 0 and language_models == 0
    # the parts held at the end of the first call and released in the second were dropped, then built anew
    for stage, ref in refs.items():
        now = pipe.memory.host.built().get(stage)
        dropped = ref() is None
        assert dropped == (now is None or now[0] is not ref()), stage
    gc.collect()
    assert any(ref() is None for ref in refs.values())

    # a budget the text encoder cannot fit even alone: refused before anything is read, naming the way out
    tight = HunyuanImagePipeline.from_pretrained(**load, host_budget_gb=HOST_BASE_CPU_GIB + 1e6 / GIB)
    with pytest.raises(MemoryError, match=r"text_encoder stage: host RAM.*the stage alone needs a host budget of at least"):
        tight(**call)
    assert tight.memory.host.built() == {}
