"""The exact tiled VAE decode and encode (hyimage/models/vae/exact_tiling.py) against the whole decode, the plan
that places it, and its simulated full-size peak.

Tiny random VAEs (real compression factors) on non-square images split into several tiles per axis at every
resolution above the latent one (tiles of 12 pixels, the last ones partial), so the 3x3 halos cross tiles and
the GroupNorms gather their statistics over several.
"""

import pytest
import torch

import hyimage.models.vae.exact_tiling as exact_tiling
from hyimage.diffusion.pipelines.parts import decode_to_images
from hyimage.models import AutoencoderKLConv3D, HunyuanVAE2D
from hyimage.models.vae.exact_tiling import ExactTiling
from hyimage.offload import MemoryManager
from hyimage.offload.planner import make_plan
from hyimage.offload.request import PlanRequest
from tests.fixtures.numerics import TOLERANCE, max_rel_error
from tests.fixtures.vae_fixtures import random_vae_state_dict, tiny_refiner_vae_config, tiny_vae_2d_config

DISTILLED_FP8 = PlanRequest(fp8=True, refiner=True)


def _vae(cls: type, config: dict) -> torch.nn.Module:
    vae = cls(**config).eval().requires_grad_(False)
    vae.load_state_dict(random_vae_state_dict(cls, config, seed=3))
    return vae


@pytest.fixture(scope="module")
def vae_2d() -> HunyuanVAE2D:
    return _vae(HunyuanVAE2D, tiny_vae_2d_config())


@pytest.fixture(scope="module")
def vae_3d() -> AutoencoderKLConv3D:
    return _vae(AutoencoderKLConv3D, tiny_refiner_vae_config())


def _whole_and_exact(vae: torch.nn.Module, run, settings: ExactTiling) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        whole = run()
        vae.exact_tiling = settings
        try:
            exact = run()
        finally:
            vae.exact_tiling = None
    return whole, exact


@pytest.mark.parametrize("activations_device", [None, "cpu"])
def test_2d_exact_decode_and_encode_equal_the_whole_ones(vae_2d, activations_device) -> None:
    torch.manual_seed(0)
    z = torch.randn(2, 64, 3, 2)  # a 96x64 image: 8x6 tiles at full resolution, 2x2 at 24x16
    settings = ExactTiling(12, activations_device)
    whole, exact = _whole_and_exact(vae_2d, lambda: vae_2d.decode(z).sample, settings)
    assert exact.shape == whole.shape == (2, 3, 96, 64)
    assert max_rel_error(exact, whole) < TOLERANCE
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    whole, exact = _whole_and_exact(vae_2d, lambda: vae_2d.encode(x).latent_dist.mean, settings)
    assert max_rel_error(exact, whole) < TOLERANCE
    # the check is sensitive: tiles blended without the whole image's statistics differ far beyond it
    vae_2d.enable_tiling(tile_latent_size=1, tile_latent_overlap=0)
    try:
        with torch.no_grad():
            blended = vae_2d.decode(z).sample
    finally:
        vae_2d.disable_tiling()
    assert max_rel_error(blended, vae_2d.decode(z).sample) > 100 * TOLERANCE


def test_3d_exact_decode_and_encode_equal_the_whole_ones(vae_3d) -> None:
    torch.manual_seed(1)
    settings = ExactTiling(12)
    for frames in (1, 2):  # the refiner's single image, and a short video (causal in time)
        z = torch.randn(1, 32, frames, 5, 3)
        whole, exact = _whole_and_exact(vae_3d, lambda: vae_3d.decode(z).sample, settings)
        assert exact.shape == whole.shape == (1, 3, 1 + 4 * (frames - 1), 80, 48)
        assert max_rel_error(exact, whole) < TOLERANCE
    x = torch.rand(1, 3, 1, 48, 80) * 2 - 1
    whole, exact = _whole_and_exact(vae_3d, lambda: vae_3d.encode(x).latent_dist.mean, settings)
    assert max_rel_error(exact, whole) < TOLERANCE


def test_exact_tiling_settings_are_checked(vae_2d) -> None:
    for tile in (7, 4, 9.0):
        with pytest.raises(ValueError, match="tile_size"):
            vae_2d.enable_exact_tiling(tile)
    vae_2d.enable_tiling()
    vae_2d.enable_exact_tiling(64, "cpu")
    assert vae_2d.use_tiling is False and vae_2d.exact_tiling == ExactTiling(64, "cpu")
    vae_2d.enable_tiling()
    assert vae_2d.exact_tiling is None
    vae_2d.disable_tiling()


def test_auto_mode_decodes_exactly_where_the_plan_says(vae_2d, vae_3d, monkeypatch) -> None:
    """Through the pipelines' decode path, with a budget whose plan places both VAEs "exact" (at 2K)."""
    plan = make_plan(DISTILLED_FP8, 8)
    assert plan.stage("vae_decode").placement == plan.stage("refiner_vae").placement == "exact"
    calls = []
    real_decode, real_encode = exact_tiling.decode, exact_tiling.encode
    monkeypatch.setattr(exact_tiling, "decode", lambda *a: calls.append(a[2]) or real_decode(*a))
    monkeypatch.setattr(exact_tiling, "encode", lambda *a: calls.append(a[2]) or real_encode(*a))
    auto = MemoryManager("cpu", "auto", gpu_budget_gb=8, request=DISTILLED_FP8)
    whole = MemoryManager("cpu", "none")
    torch.manual_seed(2)
    for vae, latents in ((vae_2d, torch.randn(1, 64, 1, 3, 4)), (vae_3d, torch.randn(1, 32, 1, 5, 4))):
        with torch.no_grad():
            expected = decode_to_images(whole, vae, latents)
            assert not calls
            images = decode_to_images(auto, vae, latents)
        stage = auto.plan.stage("vae_decode" if vae is vae_2d else "refiner_vae")
        assert calls.pop() == ExactTiling(stage.tile_size, None if stage.activations_on == "gpu" else "cpu")
        assert vae.exact_tiling is None  # restored after the stage
        assert max_rel_error(images, expected) < TOLERANCE
    pixels = torch.rand(1, 3, 1, 48, 64) * 2 - 1
    with torch.no_grad(), auto.running(vae_3d):
        encoded = vae_3d.encode(pixels).latent_dist.mean
    assert calls and max_rel_error(encoded, vae_3d.encode(pixels).latent_dist.mean) < TOLERANCE
    assert MemoryManager("cpu", "auto", request=DISTILLED_FP8).exact_tiling(vae_2d) is None  # no budget on CPU
    assert MemoryManager("cpu", "auto", gpu_budget_gb=16).exact_tiling(vae_2d) is None  # the whole decode fits


def test_activations_in_host_memory_make_room_first(vae_3d, monkeypatch) -> None:
    """A VAE placed "exact" with its activations in host memory asks the host keeper to release what the plan
    releases for its stage before it runs (the plan counts those pinned bytes); on the GPU it does not ask."""
    asked = []
    for budget, where in ((6, "host"), (8, "gpu")):
        auto = MemoryManager("cpu", "auto", gpu_budget_gb=budget, host_budget_gb=32, request=DISTILLED_FP8)
        assert auto.plan.stage("refiner_vae").activations_on == where
        monkeypatch.setattr(auto.host, "before_build", asked.append)
        with auto.running(vae_3d):
            pass
    assert asked == ["refiner_vae"]


@pytest.mark.parametrize("cls, config, shape", [
    (HunyuanVAE2D, tiny_vae_2d_config(), (1, 64, 3, 2)),
    (AutoencoderKLConv3D, tiny_refiner_vae_config(), (1, 32, 1, 5, 3)),
])
def test_under_cuda_autocast_the_exact_decode_returns_what_the_whole_one_does(cls, config, shape) -> None:
    """On fake CUDA tensors (benchmarks/memsim.py): fp16 autocast as the official decode, same dtype, shape and
    device, with the activations on the GPU or in host memory."""
    from benchmarks.memsim import fake_cuda, materialize

    with torch.device("meta"):
        vae = cls(**config).eval()
    with fake_cuda():
        materialize(vae, "cuda")
        z = torch.randn(*shape, device="cuda")
        whole = vae.decode(z).sample
        for activations_device in (None, "cpu"):
            vae.exact_tiling = ExactTiling(32, activations_device)
            exact = vae.decode(z).sample
            assert (exact.dtype, exact.device, exact.shape) == (torch.float16, whole.device, whole.shape)
    assert whole.dtype == torch.float16 and whole.device.type == "cuda"


@pytest.mark.parametrize("budget", (16, 12, 8, 6))
def test_every_vae_stage_is_planned_within_its_budget(budget: float) -> None:
    plan = make_plan(DISTILLED_FP8, budget)
    for name in ("vae_decode", "refiner_vae"):
        stage = plan.stage(name)
        assert stage.placement == ("model" if budget >= 12 else "exact"), stage
        assert stage.predicted_peak_gib + plan.margin_gib <= budget


@pytest.mark.slow
@pytest.mark.parametrize("budget", (8, 6))
def test_simulated_exact_vae_peaks_stay_within_the_plan(budget: float) -> None:
    """At full size (2048x2048) on fake CUDA: the 2D decode, the refiner's decode and its encode, each run with
    the settings the plan chose, peak within the planned figure (weights included)."""
    from benchmarks.memsim import simulate_vae_decode

    plan = make_plan(DISTILLED_FP8, budget)
    for name, encode in (("vae_decode", False), ("refiner_vae", False), ("refiner_vae", True)):
        stage = plan.stage(name)
        if name == "vae_decode" and budget == 6:
            continue  # the same settings as at 8 GiB
        settings = ExactTiling(stage.tile_size, None if stage.activations_on == "gpu" else "cpu")
        simulated = simulate_vae_decode(name, 2048, 2048, encode=encode, exact=settings)
        assert simulated["weights"] == pytest.approx(stage.weights_gib, rel=0.02)
        assert simulated["peak"] <= stage.predicted_peak_gib, (name, encode, simulated, stage)
        assert simulated["peak"] + plan.margin_gib <= budget
        if stage.activations_on == "host":
            assert 1.9 < simulated["host"] < 2.1  # two whole fp16 activations of 2048x2048x128
