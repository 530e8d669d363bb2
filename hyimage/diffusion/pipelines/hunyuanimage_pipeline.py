"""HunyuanImage-2.1 text-to-image: prompts -> embeddings -> flow-matching loop over the DiT -> VAE decode.

Numbers follow the official pipeline (schedule, Euler step, MeanFlow, guidance embedding, MIX_mode_0
guidance); unlike it, a call takes batches of prompts and images, and the guidance state is per call.
"""

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from loguru import logger
from PIL import Image

from hyimage.cache import CacheMixin
from hyimage.diffusion.guidance import Guidance, GuidanceConfig
from hyimage.diffusion.pipelines.conditioning import cfg_batch, encode_conditioning, repeat_conditioning
from hyimage.diffusion.pipelines.denoise import denoise
from hyimage.diffusion.pipelines.finite import check_finite
from hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline import HunyuanImageRefinerPipeline
from hyimage.diffusion.pipelines.loader import pipeline_from_pretrained
from hyimage.diffusion.pipelines.outputs import HunyuanImageOutput, call_output
from hyimage.diffusion.pipelines.parts import (
    Parts,
    as_list,
    autocast_dtype,
    check_embedding_widths,
    decode_to_images,
    format_images,
    running,
    step_hook,
    to_arguments,
    to_uint8,
)
from hyimage.diffusion.pipelines.sizes import resolve_size, size_from_latents
from hyimage.diffusion.request import (
    EMBEDDING_NAMES,
    check_device,
    check_request,
    plain_seed,
    refuse_unknown_keywords,
    warn_empty_prompts,
)
from hyimage.diffusion.sampling import (
    StepCallback,
    initial_noise,
    latent_shape,
    make_generators,
    unscale_latents,
)
from hyimage.errors import RequestError
from hyimage.lora import LoraMixin
from hyimage.offload import MemoryManager
from hyimage.parallel.decode import decode_on_writer
from hyimage.parallel.runner import parallel_state
from hyimage.stages import DIT, GLYPH_ENCODER, REPROMPT, TEXT_ENCODER, VAE_DECODE
from hyimage.variants import ASPECT_RATIOS, BASE_DEFAULTS, DISTILLED_DEFAULTS, SamplingDefaults

HOST_STAGES = {
    "reprompt_model": REPROMPT,
    "text_encoder": TEXT_ENCODER,
    "glyph_encoder": GLYPH_ENCODER,
    "dit": DIT,
    "vae": VAE_DECODE,
}
"""The memory plan's stage of each part (see `hyimage.offload.host`)."""


class HunyuanImagePipeline(LoraMixin, CacheMixin):
    """Text-to-image with HunyuanImage-2.1 from already-built parts.

    Each part may be the object or a zero-argument factory (function, partial, class) that builds it on
    first use. `memory` places parts on the execution device around the stage that runs them
    (default: everything on the CPU; `pipe.to("cuda")` moves execution). Defaults follow the DiT:
    `guidance_embed=True` is the distilled model (8 steps, guidance 3.25, shift 4, no CFG, MeanFlow when
    `use_meanflow`); otherwise the base model (50 steps, guidance 3.5, shift 5, CFG per `guidance`).
    """

    def __init__(
        self,
        dit: Any,
        vae: Any,
        text_encoder: Any = None,
        glyph_encoder: Any = None,
        reprompt_model: Any = None,
        refiner_pipeline: Any = None,
        memory: MemoryManager | None = None,
        guidance: GuidanceConfig | None = None,
        progress_bar: bool = True,
        parallel: Any = None,
    ) -> None:
        if dit is None or vae is None:
            raise ValueError("HunyuanImagePipeline needs `dit` and `vae` (objects or zero-argument factories)")
        self.parts = Parts(
            dit=dit,
            vae=vae,
            text_encoder=text_encoder,
            glyph_encoder=glyph_encoder,
            reprompt_model=reprompt_model,
            refiner_pipeline=refiner_pipeline,
        )
        self.memory = memory if memory is not None else MemoryManager()
        self.memory.host.register(self.parts, HOST_STAGES)
        self.guidance = guidance if guidance is not None else GuidanceConfig()
        self.progress_bar = progress_bar
        self.parallel = parallel_state(parallel)  # hyimage.parallel: None, a ParallelConfig or a ParallelState

    @classmethod
    def from_pretrained(
        cls, model_name_or_path: str | Any = None, use_fp8: bool = False, **kwargs: Any
    ) -> "HunyuanImagePipeline":
        """Build the pipeline from a variant name ($HUNYUANIMAGE_V2_1_MODEL_ROOT, default ./ckpts) or a local
        `ckpts/` folder; keywords as `hyimage.diffusion.pipelines.loader.load_pipeline` (official ones included)."""
        return pipeline_from_pretrained(cls, HunyuanImageRefinerPipeline, model_name_or_path, use_fp8, kwargs)

    # Parts, built on first use.
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
    def glyph_encoder(self) -> Any:
        return self.parts.get("glyph_encoder")

    @property
    def reprompt_model(self) -> Any:
        return self.parts.get("reprompt_model")

    @property
    def refiner_pipeline(self) -> Any:
        return self.parts.get("refiner_pipeline")

    @property
    def device(self) -> torch.device:
        return self.memory.device

    def to(self, *args: Any, device: Any = None, dtype: Any = None) -> "HunyuanImagePipeline":
        """Run on `device` from now on (parts move there when their stage runs; the device must exist) and/or
        cast the parts' weights to `dtype` (FP8-stored weights stay FP8): `to("cuda")`, `to(torch.bfloat16)`,
        `to("cuda", torch.bfloat16)`."""
        device, dtype = to_arguments(args, device, dtype)
        if device is not None:
            self.memory.to(check_device(device))
        if dtype is not None:
            self.parts.cast(dtype)
            self.memory.to(self.memory.device)  # streamers hold copies of the old weights
        refiner = self.parts.loaded("refiner_pipeline")
        if refiner is not None and (refiner.memory is not self.memory or dtype is not None):
            refiner.to(device=device if refiner.memory is not self.memory else None, dtype=dtype)
        return self

    @property
    def is_distilled(self) -> bool:
        return bool(self.parts.config("dit").guidance_embed)

    @property
    def defaults(self) -> SamplingDefaults:
        """Steps, guidance scale and shift used when the call does not name them."""
        return DISTILLED_DEFAULTS if self.is_distilled else BASE_DEFAULTS

    def check_parts(self) -> None:
        """The DiT's latent channels must be the VAE's (read from their configurations: nothing is built)."""
        dit_cfg, vae_cfg = self.parts.config("dit"), self.parts.config("vae")
        if dit_cfg.in_channels != vae_cfg.latent_channels or dit_cfg.out_channels != vae_cfg.latent_channels:
            raise ValueError(
                f"the DiT takes {dit_cfg.in_channels} and returns {dit_cfg.out_channels} latent channels but the VAE has "
                f"{vae_cfg.latent_channels}; use the VAE released with this DiT (vae/vae_2_1 for HunyuanImage-2.1)"
            )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        width: int | None = None,
        height: int | None = None,
        aspect_ratio: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        glyph_embeds: torch.Tensor | None = None,
        glyph_embeds_mask: torch.Tensor | None = None,
        negative_glyph_embeds: torch.Tensor | None = None,
        negative_glyph_embeds_mask: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        use_reprompt: bool = False,
        use_refiner: bool = False,
        refiner_handoff: str = "uint8",
        return_dict: bool | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **unknown: Any,
    ) -> Image.Image | HunyuanImageOutput | torch.Tensor | tuple:
        """Generate images.

        Returns (official behaviour, `return_dict` unset) a `PIL.Image` for one prompt, one image and
        output_type "pil"; the final latents (before the VAE) for output_type "latent"; else a
        `HunyuanImageOutput`. `return_dict=True` always returns a `HunyuanImageOutput` (`.images`), False its
        tuple, as diffusers does. `seed` (an int in [0, 2**64): image i gets seed + i; or one per image; None
        draws one, reported in `.seeds`) or `generator` (one, or one per image) fix the noise.
        `callback(step, timestep, latents)` runs after each step and may return replacement latents; diffusers'
        `callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict` too.
        `refiner_handoff` "uint8" passes the refiner an 8-bit image as the official pipeline does; "float" the
        decoded image unrounded. Precomputed embeddings replace the encoders' output; a DiT with glyph input
        given neither `glyph_embeds` nor prompt text gets zeros (no text to render). Every argument is checked
        before any part is loaded; non-finite values after a stage raise `NonFiniteError`.
        """
        if unknown:
            refuse_unknown_keywords("HunyuanImagePipeline.__call__", type(self).__call__, unknown)
        request = dict(locals())  # every argument of this call, by name, checked in one place
        check_request(
            {k: v for k, v in request.items() if k not in ("self", "unknown", "request")}, aspect_ratios=ASPECT_RATIOS
        )
        warn_empty_prompts(prompt)  # allowed (an unconditional image), but minutes spent on nothing to draw
        self._check_parts_given(prompt_embeds, negative_prompt_embeds, use_refiner, use_reprompt)
        self.check_parts()  # each part is built only when its stage runs (the host memory plan may release it)
        dit_cfg = self.parts.config("dit")
        check_embedding_widths(dit_cfg, {name: request[name] for name in EMBEDDING_NAMES})
        factor = self.parts.config("vae").ffactor_spatial * dit_cfg.patch_size[-1]

        prompts = self._prompts(prompt, prompt_embeds)
        n_prompts = len(prompts)
        negative_prompts = as_list(negative_prompt if negative_prompt is not None else "", n_prompts, "negative_prompt")

        batch = n_prompts * num_images_per_prompt
        if latents is not None:
            width, height = size_from_latents(latents, batch, width, height, aspect_ratio, factor, dit_cfg)
        else:
            width, height = resolve_size(width, height, aspect_ratio, factor)

        defaults = self.defaults
        steps = num_inference_steps if num_inference_steps is not None else defaults.num_inference_steps
        guidance_scale = guidance_scale if guidance_scale is not None else defaults.guidance_scale
        shift = shift if shift is not None else defaults.shift
        do_cfg = not self.is_distilled and guidance_scale > 1
        if not do_cfg and (any(negative_prompts) or negative_prompt_embeds is not None):
            reason = (
                "the distilled model has no classifier-free guidance"
                if self.is_distilled
                else (f"guidance_scale={guidance_scale} <= 1 turns classifier-free guidance off")
            )
            warnings.warn(f"the negative prompt is ignored: {reason}", stacklevel=3)

        if use_reprompt:
            prompts = self._reprompt(prompts)
        image_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]

        cond = encode_conditioning(
            self, prompts, prompt_embeds, prompt_embeds_mask, glyph_embeds, glyph_embeds_mask, bool(dit_cfg.glyph_byT5_v2)
        )
        if do_cfg:
            uncond = encode_conditioning(
                self,
                negative_prompts,
                negative_prompt_embeds,
                negative_prompt_embeds_mask,
                negative_glyph_embeds,
                negative_glyph_embeds_mask,
                bool(dit_cfg.glyph_byT5_v2),
            )
        refiner_text = self._encode_for_refiner(image_prompts) if use_refiner and output_type != "latent" else None
        cond = repeat_conditioning(cond, num_images_per_prompt)

        if self.parallel is not None and seed is None and generator is None:
            seed = self.parallel.shared_seeds(batch)  # the ranks of one image draw the same noise
        generators, seeds = make_generators(batch, plain_seed(seed), generator)
        compute_dtype = autocast_dtype(self.dit)
        if latents is None:
            shape = latent_shape(batch, dit_cfg.in_channels, height, width, factor, len(dit_cfg.patch_size))
            latents = initial_noise(shape, generators, compute_dtype or torch.float32, self.device)
        else:
            latents = latents.to(self.device)
            seeds = [None] * batch

        if do_cfg:
            uncond = repeat_conditioning(uncond, num_images_per_prompt)
            conditioning = cfg_batch(uncond, cond)
            guider = Guidance(self.guidance, guidance_scale, cond.ocr_mask)
        else:
            conditioning, guider = cond, None

        hook = step_hook(self, callback, callback_on_step_end, callback_on_step_end_tensor_inputs)
        latents = denoise(self, latents, conditioning, steps, shift, guidance_scale, guider, compute_dtype, hook)
        check_finite(
            latents,
            "denoising",
            "NaN/Inf weights in the DiT checkpoint (load with verify=True to name the tensor), non-finite `latents` "
            "passed in, a callback that returned them, or a half-precision overflow",
        )
        if output_type == "latent":
            return call_output(latents, image_prompts, seeds, output_type, return_dict, batch)

        images = decode_on_writer(self.parallel, self._decode, latents, device=self.device)  # other ranks: no VAE
        check_finite(
            images, "VAE decoding", "NaN/Inf weights in the VAE checkpoint (vae/vae_2_1) or a half-precision overflow"
        )
        if use_refiner:
            images = self._refine(
                images,
                image_prompts,
                negative_prompts,
                num_images_per_prompt,
                width,
                height,
                guidance_scale,
                seeds,
                generators,
                refiner_handoff,
                refiner_text,
            )
        images = format_images(images, output_type)
        return call_output(images, image_prompts, seeds, output_type, return_dict, batch)

    # Inputs.
    def _check_parts_given(
        self,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        use_refiner: bool,
        use_reprompt: bool,
    ) -> None:
        """The parts a request needs were given (checked before any is built)."""
        if use_refiner and not self.parts.given("refiner_pipeline"):
            raise RequestError(
                "use_refiner",
                "use_refiner=True needs a `refiner_pipeline`; pass one or load the pipeline with from_pretrained",
            )
        if use_reprompt and not self.parts.given("reprompt_model"):
            raise RequestError(
                "use_reprompt",
                "use_reprompt=True needs a `reprompt_model`; pass one to the pipeline or load it with from_pretrained",
            )
        if prompt_embeds is None and not self.parts.given("text_encoder"):
            raise RequestError(
                "prompt_embeds",
                "no `text_encoder` to encode prompts; pass one to the pipeline, or pass `prompt_embeds` "
                "and `negative_prompt_embeds` (with masks)",
            )

    @staticmethod
    def _prompts(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> list[str | None]:
        if prompt is None:
            return [None] * prompt_embeds.shape[0]
        return [prompt] if isinstance(prompt, str) else list(prompt)

    def _reprompt(self, prompts: list[str]) -> list[str]:
        model = self.reprompt_model
        with running(self.memory, model):
            rewritten = [model.rewrite(p) for p in prompts]
        for before, after in zip(prompts, rewritten):
            logger.info(f"reprompt: {before!r} -> {after!r}")
        return rewritten

    def _refiner(self) -> Any:
        """The refiner pipeline, running where this one runs and in its dtype."""
        refiner = self.refiner_pipeline
        if refiner.device != self.device:
            refiner.to(self.device)
        if self.parts.dtype is not None:
            refiner.to(dtype=self.parts.dtype)
        return refiner

    def _encode_for_refiner(self, prompts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """The refiner's prompt embeddings (its own template, the same language model), computed in the text stage
        so that the text encoder is not needed again after it (the host memory plan may release it)."""
        return self._refiner().encode_prompt(prompts)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images (B, 3, H, W) in [0, 1], undoing the VAE's scaling and shift as the official does."""
        vae = self.vae
        latents = unscale_latents(latents, vae.config)
        if latents.ndim == 4:
            latents = latents.unsqueeze(2)
        return decode_to_images(self.memory, vae, latents)

    def _refine(
        self,
        images: torch.Tensor,
        prompts: list[str | None],
        negative_prompts: list[str],
        num_images_per_prompt: int,
        width: int,
        height: int,
        guidance_scale: float,
        seeds: list[int | None],
        generators: Sequence[torch.Generator],
        handoff: str,
        text: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """The refiner stage on decoded images, handed over as 8-bit (official) or float images."""
        refiner = self._refiner()
        handed = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float() / 255 if handoff == "uint8" else images
        use_seeds = all(s is not None for s in seeds)
        refined = refiner(
            image=handed,
            prompt=prompts,
            negative_prompt=[p for p in negative_prompts for _ in range(num_images_per_prompt)],
            width=width,
            height=height,
            guidance_scale=guidance_scale,
            seed=seeds if use_seeds else None,
            generator=None if use_seeds else list(generators),
            prompt_embeds=text[0],
            prompt_embeds_mask=text[1],
            output_type="pt",
            return_dict=True,
        )
        return refined.images
