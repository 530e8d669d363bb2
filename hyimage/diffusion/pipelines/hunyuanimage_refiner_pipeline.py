"""HunyuanImage refiner: an image -> refiner-VAE latents as condition -> 4 steps of the refiner DiT -> decode.

The refiner VAE is causal 3-D: a still image is one frame, repeated to a frame pair whose two latents are
stacked on the channel axis (the official reorganisation). The DiT sees [noisy latents; condition
latents] on the channel axis, the condition augmented with 25% of its own noise, and the guidance scale
through its guidance embedding (no classifier-free guidance).
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from hyimage.cache import CacheMixin
from hyimage.diffusion.padding import trim_padding
from hyimage.diffusion.pipelines.finite import check_finite
from hyimage.diffusion.pipelines.loader import refiner_from_pretrained
from hyimage.diffusion.pipelines.outputs import HunyuanImageOutput, call_output
from hyimage.diffusion.pipelines.parts import (
    Parts,
    as_list,
    autocast_dtype,
    check_embedding_widths,
    decode_to_images,
    format_images,
    module_dtype,
    run_dit,
    running,
    step_hook,
    to_arguments,
)
from hyimage.diffusion.request import check_device, check_request, plain_seed, refuse_unknown_keywords
from hyimage.diffusion.sampling import (
    StepCallback,
    euler_step,
    guidance_embedding_input,
    initial_noise,
    make_generators,
    scale_latents,
    shifted_sigmas,
    timesteps_from_sigmas,
    unscale_latents,
)
from hyimage.errors import RequestError, RequestTypeError
from hyimage.lora import LoraMixin
from hyimage.offload import MemoryManager
from hyimage.parallel.decode import decode_on_writer
from hyimage.parallel.runner import parallel_forward, parallel_state
from hyimage.stages import REFINER_DIT, REFINER_VAE, TEXT_ENCODER

CONDITION_AUG_STRENGTH = 0.25
HOST_STAGES = {"dit": REFINER_DIT, "vae": REFINER_VAE, "text_encoder": TEXT_ENCODER}
"""The memory plan's stage of each part (see `hyimage.offload.host`); the text encoder is the base pipeline's."""


def frames_to_channel_pairs(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) -> (B, 2C, (F+1)/2, h, w): repeat the first frame, then stack each frame pair on channels."""
    latents = torch.cat([latents[:, :, :1], latents], dim=2)
    b, c, f, h, w = latents.shape
    return latents.reshape(b, c, f // 2, 2, h, w).permute(0, 3, 1, 2, 4, 5).reshape(b, 2 * c, f // 2, h, w)


def channel_pairs_to_frames(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `frames_to_channel_pairs`: unstack the channel pairs into frames and drop the repeated first one."""
    b, c2, f, h, w = latents.shape
    frames = latents.reshape(b, 2, c2 // 2, f, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * f, h, w)
    return frames[:, :, 1:]


def images_to_tensor(image: Any) -> torch.Tensor:
    """A PIL image, a list of them, a uint8 array (B?, H, W, 3) or a float tensor (B?, 3, H, W) in [0, 1] as (B, 3, H, W) in [0, 1]."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and all(isinstance(i, Image.Image) for i in image):
        arrays = [np.asarray(i.convert("RGB")) for i in image]
        if len({a.shape for a in arrays}) != 1:
            raise RequestError("image", "all images given to the refiner must have the same size")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    if isinstance(image, np.ndarray):
        array = image[None] if image.ndim == 3 else image
        tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
        return tensor.float() / 255 if array.dtype == np.uint8 else tensor.float()
    if isinstance(image, torch.Tensor):
        tensor = image[None] if image.ndim == 3 else image
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise RequestError(
                "image", f"an image tensor must be (3, H, W) or (B, 3, H, W) in [0, 1], got {tuple(image.shape)}"
            )
        return tensor.float()
    raise RequestTypeError(
        "image", f"`image` must be a PIL image, a list of them, a uint8 array or a tensor, got {type(image).__name__}"
    )


class HunyuanImageRefinerPipeline(LoraMixin, CacheMixin):
    """Refines images with the HunyuanImage refiner DiT and the causal 3-D refiner VAE.

    Parts may be objects or zero-argument factories. Defaults are the official ones when the base
    pipeline hands over: 4 steps, shift 4, the base call's guidance scale (3.5 when called alone).
    """

    DIT_STAGE = REFINER_DIT  # the memory plan counts its step cache in the refiner's DiT stage

    default_num_inference_steps = 4
    default_shift = 4
    default_guidance_scale = 3.5

    def __init__(
        self,
        dit: Any,
        vae: Any,
        text_encoder: Any = None,
        memory: MemoryManager | None = None,
        progress_bar: bool = True,
        parallel: Any = None,
    ) -> None:
        if dit is None or vae is None:
            raise ValueError("HunyuanImageRefinerPipeline needs `dit` and `vae` (objects or zero-argument factories)")
        self.parts = Parts(dit=dit, vae=vae, text_encoder=text_encoder)
        self.memory = memory if memory is not None else MemoryManager()
        self.memory.host.register(self.parts, HOST_STAGES)
        self.progress_bar = progress_bar
        self.parallel = parallel_state(parallel)  # sequence parallelism only: the refiner has no CFG

    @classmethod
    def from_pretrained(cls, model_name_or_path: str | Any = None, **kwargs: Any) -> "HunyuanImageRefinerPipeline":
        """Build the refiner from the official checkpoint layout ($HUNYUANIMAGE_V2_1_MODEL_ROOT, default ./ckpts) or a
        local `ckpts/` folder given first."""
        return refiner_from_pretrained(cls, model_name_or_path, kwargs)

    @property
    def dit(self) -> torch.nn.Module:
        return self.parts.get("dit")

    @property
    def vae(self) -> torch.nn.Module:
        return self.parts.get("vae")

    @property
    def text_encoder(self) -> Any:
        return self.parts.get("text_encoder")

    @property
    def device(self) -> torch.device:
        return self.memory.device

    def to(self, *args: Any, device: Any = None, dtype: Any = None) -> "HunyuanImageRefinerPipeline":
        """Run on `device` from now on (it must exist) and/or cast the parts' weights to `dtype`, as
        `HunyuanImagePipeline.to`."""
        device, dtype = to_arguments(args, device, dtype)
        if device is not None:
            self.memory.to(check_device(device))
        if dtype is not None:
            self.parts.cast(dtype)
            self.memory.to(self.memory.device)
        return self

    def check_parts(self) -> None:
        """The refiner DiT reads [noisy; condition] latents, each two VAE latents stacked on channels (read from their
        configurations: nothing is built)."""
        dit_cfg, vae_cfg = self.parts.config("dit"), self.parts.config("vae")
        pair = 2 * vae_cfg.latent_channels
        if dit_cfg.out_channels != pair or dit_cfg.in_channels != 2 * pair:
            raise ValueError(
                f"the refiner DiT takes {dit_cfg.in_channels} and returns {dit_cfg.out_channels} channels, but a VAE with "
                f"{vae_cfg.latent_channels} latent channels needs {2 * pair} and {pair}; use vae/vae_refiner with the refiner DiT"
            )
        if not dit_cfg.guidance_embed:
            raise ValueError(
                "the refiner DiT must be guidance-distilled (guidance_embed=True); load the hunyuanimage-refiner DiT"
            )

    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        return_dict: bool | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **unknown: Any,
    ) -> Image.Image | HunyuanImageOutput | torch.Tensor | tuple:
        """Refine `image` (one or a batch) guided by `prompt`; width/height default to the image's size.

        `negative_prompt` is accepted for symmetry with the base pipeline and unused (the refiner has no CFG).
        Returns a PIL image for one image and output_type "pil", the final latents for "latent", else a
        `HunyuanImageOutput` (`return_dict` as in `HunyuanImagePipeline.__call__`). Each image's noise, VAE
        sample and condition noise come from its seed. Arguments are checked before any part is loaded.
        """
        if unknown:
            refuse_unknown_keywords("HunyuanImageRefinerPipeline.__call__", type(self).__call__, unknown)
        pixels = images_to_tensor(image)
        batch = pixels.shape[0]
        if not bool(torch.isfinite(pixels).all()):
            raise RequestError("image", "`image` holds NaN or Inf values; pass an image in [0, 1]")
        request = {k: v for k, v in locals().items() if k not in ("self", "unknown", "image", "pixels", "batch")}
        request["width"] = pixels.shape[-1] if width is None else width
        request["height"] = pixels.shape[-2] if height is None else height
        check_request(request, size_multiple=16, image_count=batch)
        if prompt_embeds is None and not self.parts.given("text_encoder"):
            raise RequestError(
                "prompt_embeds",
                "no `text_encoder` to encode the prompt; pass one to the refiner, or pass `prompt_embeds`",
            )
        self.check_parts()  # each part is built only when its stage runs (the host memory plan may release it)
        check_embedding_widths(self.parts.config("dit"), {"prompt_embeds": prompt_embeds})
        factor = self.parts.config("vae").ffactor_spatial
        width, height = request["width"], request["height"]
        for name, value in (("width", width), ("height", height)):
            if value < factor or value % factor:
                raise RequestError(
                    name, f"`{name}`={value} must be a positive multiple of {factor} (the refiner VAE's factor)"
                )
        if (height, width) != tuple(pixels.shape[-2:]):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(height, width), mode="bicubic", align_corners=False
            ).clamp(0, 1)

        prompts = as_list(
            prompt[0] if isinstance(prompt, (list, tuple)) and len(prompt) == 1 else prompt, batch, "prompt"
        )
        if prompt_embeds is None:
            prompt_embeds, prompt_embeds_mask = self.encode_prompt(prompts)
        else:
            check_finite(prompt_embeds, "the text embeddings given", "the `prompt_embeds` passed in hold NaN or Inf")

        steps = num_inference_steps if num_inference_steps is not None else self.default_num_inference_steps
        guidance_scale = guidance_scale if guidance_scale is not None else self.default_guidance_scale
        shift = shift if shift is not None else self.default_shift
        noise_generators, seeds = make_generators(batch, plain_seed(seed), generator)
        condition_generators = (
            [torch.Generator().manual_seed(s) for s in seeds] if all(s is not None for s in seeds) else noise_generators
        )

        shape = (batch, self.parts.config("dit").out_channels, 1, height // factor, width // factor)
        noise = initial_noise(shape, noise_generators, torch.float32, self.device)  # drawn before the condition's
        condition = self._condition(pixels, condition_generators)
        compute_dtype = autocast_dtype(self.dit)  # the DiT is built after the VAE has encoded (the host plan's order)
        latents = noise.to(compute_dtype or torch.float32)
        check_finite(
            condition, "the refiner VAE's encoding", "NaN/Inf weights in the refiner VAE checkpoint (vae/vae_refiner)"
        )
        latents = self._denoise(
            latents,
            condition,
            prompt_embeds,
            prompt_embeds_mask,
            steps,
            shift,
            guidance_scale,
            compute_dtype,
            step_hook(self, callback, callback_on_step_end, callback_on_step_end_tensor_inputs),
        )
        check_finite(
            latents,
            "refining",
            "NaN/Inf weights in the refiner DiT checkpoint (load with verify=True to name the tensor)",
        )
        if output_type == "latent":
            images = latents
        else:
            decoded = decode_on_writer(self.parallel, self._decode, latents, device=self.device)  # one rank decodes
            check_finite(
                decoded, "the refiner VAE's decoding", "NaN/Inf weights in vae/vae_refiner or a half-precision overflow"
            )
            images = format_images(decoded, output_type)
        return call_output(images, prompts, seeds, output_type, return_dict, batch)

    def encode_prompt(self, prompts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings and mask with the refiner's template (the text encoder stage)."""
        encoder = self.text_encoder
        with running(self.memory, encoder):
            embeds, mask = encoder.encode(prompts)
        check_finite(embeds, "the text encoder", "NaN/Inf weights in the text encoder checkpoint (text_encoder/llm)")
        return embeds, mask

    def _condition(self, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Condition latents: VAE sample, frame pairs on channels, shift and scale, then condition augmentation."""
        vae = self.vae
        with running(self.memory, vae):
            dist = vae.encode((pixels * 2 - 1).unsqueeze(2).to(self.device, module_dtype(vae))).latent_dist
        noise = initial_noise(tuple(dist.mean.shape), generators, dist.mean.dtype, dist.mean.device)
        latents = frames_to_channel_pairs(dist.mean + dist.std * noise)
        latents = scale_latents(latents, vae.config)
        aug_noise = initial_noise(tuple(latents.shape), generators, latents.dtype, latents.device)
        return CONDITION_AUG_STRENGTH * aug_noise + (1 - CONDITION_AUG_STRENGTH) * latents

    def _denoise(
        self,
        latents: torch.Tensor,
        condition: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        steps: int,
        shift: float,
        guidance_scale: float,
        compute_dtype: torch.dtype | None,
        hook: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        device, dit = self.device, self.dit
        sigmas = shifted_sigmas(steps, shift)
        host_timesteps = timesteps_from_sigmas(sigmas).tolist()  # for the callback: no device read per step
        sigmas = sigmas.to(device)
        timesteps = timesteps_from_sigmas(sigmas)
        text, text_mask = trim_padding(text.to(device), text_mask.to(device))
        condition = condition.to(device)
        with running(self.memory, dit), parallel_forward(self.parallel, dit, False, run_dit) as forward:
            forward = self.cached_forward(forward)  # hyimage.cache: skips or predicts steps when enabled
            for i, t in enumerate(tqdm(timesteps, desc="Refining", disable=not self.progress_bar)):
                model_input = torch.cat([latents, condition], dim=1)
                n = model_input.shape[0]
                guidance = guidance_embedding_input(guidance_scale, n, device, model_input.dtype)
                pred = forward(dit, compute_dtype, model_input, t.repeat(n), text, text_mask, guidance=guidance)
                latents = euler_step(latents, pred, sigmas[i], sigmas[i + 1])
                latents = hook(i, t, latents, host_timesteps[i])
        return latents

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents to images (B, 3, H, W) in [0, 1]."""
        vae = self.vae
        return decode_to_images(self.memory, vae, channel_pairs_to_frames(unscale_latents(latents, vae.config)))
