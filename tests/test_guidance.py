"""CFG, APG and the per-sample MIX_mode_0 against diffusers' guiders (which follow the official cfg_utils).

diffusers' AdaptiveProjectedMixGuidance holds ONE switch step for all samples; the official MIX_mode_0 keeps
two guiders (OCR: after step 38, general: after step 5) and splits the batch by prompt. Our `Guidance`
decides per sample, so each sample is compared with a diffusers guider of its own kind run on it alone.
"""

import pytest
import torch

from hyimage.diffusion.guidance import Guidance, GuidanceConfig, apg, cfg, rescale_noise_cfg
from tests.fixtures.numerics import TOLERANCE, max_rel_error


def predictions(steps: int, batch: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step (cond, uncond), large enough for APG's norm threshold (10) to clip."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 8, 4, 3, generator=g) * 3, torch.randn(batch, 8, 4, 3, generator=g) * 3)
        for _ in range(steps)
    ]


def diffusers_guidance(start_step: int, scale: float = 3.5, **kwargs):
    from diffusers.guiders import AdaptiveProjectedMixGuidance

    return AdaptiveProjectedMixGuidance(
        guidance_scale=scale, adaptive_projected_guidance_start_step=start_step, **kwargs
    )


def run_diffusers(guider, preds: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    out = []
    for step, (cond, uncond) in enumerate(preds):
        guider.set_state(step=step, num_inference_steps=len(preds), timestep=torch.tensor(1000.0))
        guider.prepare_inputs({"x": (cond, uncond)})
        out.append(guider(_batches(cond, uncond)).pred)
    return out


def _batches(cond: torch.Tensor, uncond: torch.Tensor) -> list:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

    first, second = BlockState(noise_pred=cond), BlockState(noise_pred=uncond)
    first.__guidance_identifier__ = "pred_cond"
    second.__guidance_identifier__ = "pred_uncond"
    return [first, second]


def test_cfg_formula() -> None:
    cond, uncond = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(cfg(cond, uncond, 3.5), uncond + 3.5 * (cond - uncond))


def test_rescale_matches_diffusers() -> None:
    from diffusers.guiders.guider_utils import rescale_noise_cfg as reference

    cond, guided = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4) * 3
    assert max_rel_error(rescale_noise_cfg(guided, cond, 0.7), reference(guided, cond, 0.7)) <= TOLERANCE


def test_apg_matches_diffusers_normalized_guidance() -> None:
    from diffusers.guiders.adaptive_projected_guidance_mix import normalized_guidance

    cond, uncond = torch.randn(2, 8, 4, 3) * 3, torch.randn(2, 8, 4, 3) * 3
    for eta in (0.0, 0.5):
        ours = apg(cond, uncond, cond - uncond, 10.0, eta, 10.0)
        ref = normalized_guidance(cond, uncond, 10.0, None, eta, 10.0)
        assert max_rel_error(ours, ref) <= TOLERANCE


def test_mix_mode_switches_per_sample_like_the_official_two_guiders() -> None:
    """Sample 0 general (CFG to step 5, APG after), sample 1 OCR (CFG to step 38, APG after), in one batch."""
    preds = predictions(42)
    ours = Guidance(GuidanceConfig(), 3.5, torch.tensor([False, True]))
    guided = [ours(cond, uncond, step) for step, (cond, uncond) in enumerate(preds)]
    for sample, start in ((0, 5), (1, 38)):
        alone = [(c[sample : sample + 1], u[sample : sample + 1]) for c, u in preds]
        reference = run_diffusers(diffusers_guidance(start), alone)
        for step, (got, ref) in enumerate(zip(guided, reference)):
            assert max_rel_error(got[sample : sample + 1], ref) <= TOLERANCE, (sample, step)
    assert ours.uses_apg(5).tolist() == [False, False] and ours.uses_apg(6).tolist() == [True, False]
    assert ours.uses_apg(39).tolist() == [True, True]


def test_apg_differs_from_cfg_after_the_switch() -> None:
    """The comparison above is meaningful: from step 6 the general sample leaves CFG."""
    preds = predictions(8)
    ours = Guidance(GuidanceConfig(), 3.5, torch.tensor([False]))
    guided = [ours(c[:1], u[:1], step) for step, (c, u) in enumerate(preds)]
    plain = [cfg(c[:1], u[:1], 3.5) for c, u in preds]
    assert torch.equal(guided[5], plain[5])
    assert max_rel_error(guided[6], plain[6]) > 1e-2


def test_momentum_resets_at_step_zero() -> None:
    """A guidance object reused for a second run restarts its momentum at step 0, like the official guider."""
    preds = predictions(8)
    reused = Guidance(GuidanceConfig(), 3.5, torch.tensor([False, False]))
    first = [reused(c, u, s) for s, (c, u) in enumerate(preds)]
    second = [reused(c, u, s) for s, (c, u) in enumerate(preds)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_apg_mode_and_cfg_mode_with_rescale() -> None:
    preds = predictions(12)
    apg_mode = Guidance(GuidanceConfig(mode="APG_mode_0"), 3.5, torch.tensor([False, True]))
    reference = run_diffusers(diffusers_guidance(10), preds)
    for step, (cond, uncond) in enumerate(preds):
        assert max_rel_error(apg_mode(cond, uncond, step), reference[step]) <= TOLERANCE

    from diffusers.guiders.guider_utils import rescale_noise_cfg as reference_rescale

    cfg_mode = Guidance(GuidanceConfig(mode="cfg", guidance_rescale=0.7), 3.5, torch.tensor([False, True]))
    cond, uncond = preds[0]
    expected = reference_rescale(uncond + 3.5 * (cond - uncond), cond, 0.7)
    assert max_rel_error(cfg_mode(cond, uncond, 20), expected) <= TOLERANCE


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="unknown"):
        GuidanceConfig(mode="APG")
