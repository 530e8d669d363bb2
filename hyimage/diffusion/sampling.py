"""Flow-matching sampling: the shifted schedule, the Euler step, MeanFlow and guidance inputs, initial noise."""

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import torch

StepCallback = Callable[[int, float, torch.Tensor], torch.Tensor | None]
"""`callback(step, timestep, latents)` run after each denoising step; it may return replacement latents."""


def scale_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """VAE latents to the DiT's space: `(z - shift_factor) * scaling_factor` (no shift when it is unset or 0)."""
    shift = getattr(vae_config, "shift_factor", None)
    if shift:
        latents = latents - shift
    return latents * vae_config.scaling_factor


def unscale_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """The DiT's latents back to the VAE's space: `z / scaling_factor + shift_factor`."""
    latents = latents / vae_config.scaling_factor
    shift = getattr(vae_config, "shift_factor", None)
    return latents + shift if shift else latents


def after_step(
    callback: StepCallback | None, step: int, timestep: float | torch.Tensor, latents: torch.Tensor
) -> torch.Tensor:
    """The latents after the user's per-step callback: what it returns, or the same latents if it returns None.

    Pass `timestep` as a Python float: reading a device tensor back would stall the loop at every step.
    """
    if callback is None:
        return latents
    replaced = callback(step, float(timestep), latents)
    return latents if replaced is None else replaced


def shifted_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """`num_steps + 1` noise levels from 1 to 0, warped by `sigma' = shift*s / (1 + (shift-1)*s)` (float32)."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    sigmas = torch.linspace(1, 0, num_steps + 1)
    sigmas = (shift * sigmas) / (1 + (shift - 1) * sigmas)
    return sigmas.to(torch.float32)


def timesteps_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The DiT's timestep for each step: sigma * 1000, without the final 0."""
    return (sigmas[:-1] * 1000).to(torch.float32)


def meanflow_timesteps_r(timesteps: torch.Tensor) -> torch.Tensor:
    """MeanFlow's second timestep for each step: the next step's timestep, 0 at the last step."""
    return torch.cat([timesteps[1:], timesteps.new_zeros(1)])


def euler_step(
    latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One Euler step of the flow from `sigma` to `sigma_next`, in float32."""
    return latents.float() - (sigma - sigma_next) * velocity.float()


def guidance_embedding_input(
    guidance_scale: float, batch_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The `guidance` input of a guidance-distilled DiT: the scale times 1000, one per sample."""
    scale = torch.full((batch_size,), guidance_scale, dtype=torch.float32, device=device)
    return scale.to(dtype) * 1000


def latent_shape(
    batch_size: int, channels: int, height: int, width: int, spatial_factor: int, patch_dims: int
) -> tuple[int, ...]:
    """Shape of the initial latents: (B, C, h, w) for a 2-D DiT, (B, C, 1, h, w) for a 3-D one."""
    h, w = height // spatial_factor, width // spatial_factor
    if patch_dims == 2:
        return (batch_size, channels, h, w)
    if patch_dims == 3:
        return (batch_size, channels, 1, h, w)
    raise ValueError(f"the DiT's patch_size must have 2 or 3 entries, got {patch_dims}")


def make_generators(
    batch_size: int,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[list[torch.Generator], list[int | None]]:
    """One generator per image and the seed behind each (None where the caller passed generators).

    `seed` may be one int (image i gets seed + i) or one per image; `generator` one for all or one per image.
    Without either, fresh seeds are drawn and returned so the result can be reproduced.
    """
    if seed is not None and generator is not None:
        raise ValueError("pass either `seed` or `generator`, not both")
    if generator is not None:
        if isinstance(generator, torch.Generator):
            return [generator] * batch_size, [None] * batch_size
        generators = list(generator)
        if len(generators) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generators)} generators but {batch_size} images are requested; "
                "pass one generator per image (prompts x num_images_per_prompt)"
            )
        return generators, [None] * batch_size
    if seed is None:
        seeds = [secrets.randbelow(2**31) for _ in range(batch_size)]
    elif isinstance(seed, int):
        seeds = [seed + i for i in range(batch_size)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != batch_size:
            raise ValueError(
                f"`seed` is a list of {len(seeds)} seeds but {batch_size} images are requested; pass one seed per image or one int"
            )
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds], seeds


def initial_noise(
    shape: tuple[int, ...], generators: Sequence[torch.Generator], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Standard normal noise, each sample drawn from its own generator (as the official pipeline draws one image)."""
    samples = [
        torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32).to(dtype) for g in generators
    ]
    return torch.cat(samples).to(device)
