"""The text-to-image denoising loop as a plain function over a pipeline's parts."""

from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from hyimage.diffusion.guidance import Guidance
from hyimage.diffusion.padding import trim_padding
from hyimage.diffusion.pipelines.conditioning import Conditioning
from hyimage.diffusion.pipelines.parts import run_dit, running
from hyimage.diffusion.sampling import (
    euler_step,
    guidance_embedding_input,
    meanflow_timesteps_r,
    shifted_sigmas,
    timesteps_from_sigmas,
)
from hyimage.parallel.runner import parallel_forward


def denoise(
    pipe: Any,
    latents: torch.Tensor,
    c: Conditioning,
    steps: int,
    shift: float,
    guidance_scale: float,
    guider: Guidance | None,
    compute_dtype: torch.dtype | None,
    hook: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """The flow-matching loop of `pipe` (a HunyuanImagePipeline): `steps` Euler steps over the shifted schedule,
    classifier-free guidance through `guider` when given, `hook` after each step."""
    device, dit = pipe.device, pipe.dit
    sigmas = shifted_sigmas(steps, shift)
    host_timesteps = timesteps_from_sigmas(sigmas).tolist()  # for the callback: no device read per step
    sigmas = sigmas.to(device)
    timesteps = timesteps_from_sigmas(sigmas)
    timesteps_r = meanflow_timesteps_r(timesteps) if dit.config.use_meanflow else None
    copies = 2 if guider is not None else 1
    c.text, c.text_mask = trim_padding(c.text, c.text_mask)
    if c.glyph is not None:
        c.glyph, c.glyph_mask = trim_padding(c.glyph, c.glyph_mask)
    with running(pipe.memory, dit), parallel_forward(pipe.parallel, dit, guider is not None, run_dit) as forward:
        forward = pipe.cached_forward(forward)  # hyimage.cache: skips or predicts steps when enabled
        for i, t in enumerate(tqdm(timesteps, desc="Denoising", disable=not pipe.progress_bar)):
            model_input = torch.cat([latents] * copies)
            n = model_input.shape[0]
            guidance = (
                guidance_embedding_input(guidance_scale, n, device, model_input.dtype)
                if dit.config.guidance_embed
                else None
            )
            pred = forward(
                dit,
                compute_dtype,
                model_input,
                t.repeat(n),
                c.text,
                c.text_mask,
                byt5_text_states=c.glyph,
                byt5_text_mask=c.glyph_mask,
                guidance=guidance,
                timesteps_r=None if timesteps_r is None else timesteps_r[i].repeat(n),
            )
            if guider is not None:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = guider(pred_cond, pred_uncond, i)
            latents = euler_step(latents, pred, sigmas[i], sigmas[i + 1])
            latents = hook(i, t, latents, host_timesteps[i])
    return latents
