"""Sampling functions against hand-checkable facts and diffusers' FlowMatchEulerDiscreteScheduler."""

import numpy as np
import pytest
import torch

from hyimage.diffusion.sampling import (
    euler_step,
    guidance_embedding_input,
    initial_noise,
    latent_shape,
    make_generators,
    meanflow_timesteps_r,
    shifted_sigmas,
    timesteps_from_sigmas,
)


def test_shift_one_is_linear_and_formula_holds() -> None:
    assert torch.allclose(shifted_sigmas(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    sigmas = shifted_sigmas(2, 5.0)
    assert sigmas.dtype == torch.float32
    assert sigmas.tolist() == pytest.approx([1.0, 2.5 / 3.0, 0.0], rel=1e-6)  # 5*0.5 / (1 + 4*0.5)
    assert timesteps_from_sigmas(sigmas).tolist() == pytest.approx([1000.0, 2500 / 3.0], rel=1e-6)


@pytest.mark.parametrize("steps, shift", [(8, 4.0), (50, 5.0), (4, 4.0)])
def test_schedule_matches_diffusers(steps: int, shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    sigmas = shifted_sigmas(steps, shift)
    assert torch.allclose(sigmas, scheduler.sigmas.float(), atol=1e-6)
    assert torch.allclose(timesteps_from_sigmas(sigmas), scheduler.timesteps.float(), atol=1e-3)


def test_euler_step_matches_diffusers_and_is_float32() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 9)[:-1])
    sigmas = shifted_sigmas(8, 5.0)
    latents, velocity = torch.randn(2, 8, 3, 2), torch.randn(2, 8, 3, 2)
    for i, t in enumerate(scheduler.timesteps):
        ours = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
        ref = scheduler.step(velocity, t, latents, return_dict=False)[0]
        assert torch.allclose(ours, ref, atol=1e-6)
    half = euler_step(latents.bfloat16(), velocity.bfloat16(), sigmas[0], sigmas[1])
    assert half.dtype == torch.float32


def test_meanflow_r_is_the_next_timestep_then_zero() -> None:
    timesteps = torch.tensor([1000.0, 750.0, 500.0])
    assert meanflow_timesteps_r(timesteps).tolist() == [750.0, 500.0, 0.0]


def test_guidance_embedding_input_is_scale_times_1000() -> None:
    assert guidance_embedding_input(3.25, 2, torch.device("cpu"), torch.float32).tolist() == [3250.0, 3250.0]
    # the official pipeline casts to the latents' dtype first: in bf16 3.25 * 1000 rounds to 3248
    assert guidance_embedding_input(3.25, 1, torch.device("cpu"), torch.bfloat16).item() == 3248.0


def test_latent_shape_for_2d_and_3d_dits() -> None:
    assert latent_shape(2, 64, 2048, 1536, 32, 2) == (2, 64, 64, 48)
    assert latent_shape(1, 64, 2048, 1536, 16, 3) == (1, 64, 1, 128, 96)


def test_noise_per_sample_is_the_seeds_own_draw() -> None:
    generators, seeds = make_generators(3, seed=42)
    assert seeds == [42, 43, 44]
    noise = initial_noise((3, 4, 2, 2), generators, torch.bfloat16, torch.device("cpu"))
    for i, s in enumerate(seeds):
        expected = torch.randn((1, 4, 2, 2), generator=torch.Generator("cpu").manual_seed(s), dtype=torch.bfloat16)
        assert torch.equal(noise[i : i + 1], expected)


def test_generators_and_seeds_arguments() -> None:
    one = torch.Generator().manual_seed(1)
    gens, seeds = make_generators(2, generator=one)
    assert gens == [one, one] and seeds == [None, None]
    _, seeds = make_generators(2, seed=[5, 9])
    assert seeds == [5, 9]
    _, drawn = make_generators(2)
    assert all(isinstance(s, int) for s in drawn)
    with pytest.raises(ValueError, match="not both"):
        make_generators(1, seed=1, generator=one)
    with pytest.raises(ValueError, match="one generator per image"):
        make_generators(3, generator=[one, one])
    with pytest.raises(ValueError, match="at least 1"):
        shifted_sigmas(0, 4.0)
