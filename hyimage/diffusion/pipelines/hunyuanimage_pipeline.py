"""HunyuanImage-2.1 text-to-image: prompts -> embeddings -> flow-matching loop over the DiT -> VAE decode.

Numbers follow the official pipeline (schedule, Euler step, MeanFlow, guidance embedding, MIX_mode_0
guidance); unlike it, a call takes batches of prompts and images, and the guidance state is per call.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger
from PIL import Image
from tqdm import tqdm

from hyimage.diffusion.guidance import Guidance, GuidanceConfig
from hyimage.diffusion.pipelines.parts import (
    Parts,
    as_list,
    autocast_dtype,
    cat_padded,
    check_embeds,
    check_output_type,
    decode_to_images,
    format_images,
    running,
    to_uint8,
)
from hyimage.diffusion.sampling import (
    StepCallback,
    after_step,
    euler_step,
    guidance_embedding_input,
    initial_noise,
    latent_shape,
    make_generators,
    meanflow_timesteps_r,
    shifted_sigmas,
    timesteps_from_sigmas,
    unscale_latents,
)
from hyimage.lora import LoraMixin
from hyimage.offload import MemoryManager
from hyimage.parallel.runner import parallel_forward, parallel_state

# The official 2K presets (width, height). The official README names 3:2 and 2:3 without sizes;
# these are the exact-ratio multiples of 32 with the same pixel count as the others (~4.1 MP).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (2048, 2048),
    "16:9": (2560, 1536),
    "9:16": (1536, 2560),
    "4:3": (2304, 1792),
    "3:4": (1792, 2304),
    "3:2": (2496, 1664),
    "2:3": (1664, 2496),
}

GLYPH_LENGTH = 128
GLYPH_DIM = 1472


@dataclass(frozen=True)
class SamplingDefaults:
    """Steps, guidance scale and shift of a model variant (the official README table)."""

    num_inference_steps: int
    guidance_scale: float
    shift: float


BASE_DEFAULTS = SamplingDefaults(num_inference_steps=50, guidance_scale=3.5, shift=5)
DISTILLED_DEFAULTS = SamplingDefaults(num_inference_steps=8, guidance_scale=3.25, shift=4)


@dataclass
class HunyuanImageOutput:
    """Images of one call and what produced each: the prompt as used (after reprompting) and its seed."""

    images: list[Image.Image] | Any
    prompts: list[str | None]
    seeds: list[int | None]


@dataclass
class _Conditioning:
    """Everything the DiT reads besides latents and time, batched as the loop feeds it."""

    text: torch.Tensor
    text_mask: torch.Tensor
    glyph: torch.Tensor | None
    glyph_mask: torch.Tensor | None
    ocr_mask: torch.Tensor


def resolve_size(width: int | None, height: int | None, aspect_ratio: str | None, factor: int) -> tuple[int, int]:
    """Width and height from explicit sizes or an aspect-ratio preset, checked against the VAE factor."""
    if aspect_ratio is not None:
        if width is not None or height is not None:
            raise ValueError("pass either `aspect_ratio` or `width`/`height`, not both")
        if aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"aspect_ratio {aspect_ratio!r} is unknown; choose one of {', '.join(ASPECT_RATIOS)}")
        width, height = ASPECT_RATIOS[aspect_ratio]
    width = 2048 if width is None else width
    height = 2048 if height is None else height
    for name, value in (("width", width), ("height", height)):
        if value < factor or value % factor:
            raise ValueError(
                f"`{name}`={value} must be a positive multiple of {factor} (the VAE's downsampling factor); "
                f"e.g. {max(factor, round(value / factor) * factor)}"
            )
    return width, height


class HunyuanImagePipeline(LoraMixin):
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
        self.guidance = guidance if guidance is not None else GuidanceConfig()
        self.progress_bar = progress_bar
        self.parallel = parallel_state(parallel)  # hyimage.parallel: None, a ParallelConfig or a ParallelState

    @classmethod
    def from_pretrained(
        cls, model_name: str = "hunyuanimage-v2.1", use_fp8: bool = False, **kwargs: Any
    ) -> "HunyuanImagePipeline":
        """Build the pipeline from the official checkpoint layout ($HUNYUANIMAGE_V2_1_MODEL_ROOT, default ./ckpts)."""
        from hyimage.loading.pipeline_loader import load_pipeline

        return load_pipeline(cls, model_name=model_name, use_fp8=use_fp8, **kwargs)

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

    def to(self, device: str | torch.device) -> "HunyuanImagePipeline":
        """Run on `device` from now on (parts move there when their stage runs)."""
        self.memory.to(device)
        refiner = self.parts.loaded("refiner_pipeline")
        if refiner is not None and refiner.memory is not self.memory:
            refiner.to(device)
        return self

    @property
    def is_distilled(self) -> bool:
        return bool(self.dit.config.guidance_embed)

    @property
    def defaults(self) -> SamplingDefaults:
        """Steps, guidance scale and shift used when the call does not name them."""
        return DISTILLED_DEFAULTS if self.is_distilled else BASE_DEFAULTS

    def check_parts(self) -> None:
        """The DiT's latent channels must be the VAE's."""
        dit_cfg, vae_cfg = self.dit.config, self.vae.config
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
    ) -> Image.Image | HunyuanImageOutput | torch.Tensor:
        """Generate images.

        Returns a `PIL.Image` for one prompt, one image and output_type "pil"; the final latents (before the
        VAE) for output_type "latent"; else a `HunyuanImageOutput`. `seed` (image i gets seed + i, or one per
        image) or `generator` (one, or one per image) fix the noise; the same seed gives the same image.
        `callback(step, timestep, latents)` runs after each step and may return replacement latents.
        `refiner_handoff` "uint8" passes the refiner an 8-bit image as the official pipeline does; "float" the
        decoded image unrounded. Precomputed embeddings replace the encoders' output; a DiT with glyph input
        given neither `glyph_embeds` nor prompt text gets zeros (no text to render).
        """
        check_output_type(output_type)
        if refiner_handoff not in ("uint8", "float"):
            raise ValueError(f"refiner_handoff {refiner_handoff!r} is unknown; choose 'uint8' or 'float'")
        if use_refiner and prompt is None:
            raise ValueError(
                "use_refiner=True needs `prompt` text: the refiner encodes the prompt with its own template"
            )
        if use_refiner and not self.parts.given("refiner_pipeline"):
            raise ValueError(
                "use_refiner=True needs a `refiner_pipeline`; pass one or load the pipeline with from_pretrained"
            )
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        dit, vae = self.dit, self.vae
        self.check_parts()
        dit_cfg = dit.config
        factor = vae.config.ffactor_spatial * dit_cfg.patch_size[-1]

        prompts = self._prompts(prompt, prompt_embeds, use_reprompt)
        n_prompts = len(prompts)
        negative_prompts = as_list(negative_prompt if negative_prompt is not None else "", n_prompts, "negative_prompt")
        for name, embeds, mask in (
            ("prompt_embeds", prompt_embeds, prompt_embeds_mask),
            ("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_embeds_mask),
            ("glyph_embeds", glyph_embeds, glyph_embeds_mask),
            ("negative_glyph_embeds", negative_glyph_embeds, negative_glyph_embeds_mask),
        ):
            check_embeds(embeds, mask, name, n_prompts)

        batch = n_prompts * num_images_per_prompt
        if latents is not None:
            width, height = self._size_from_latents(latents, batch, width, height, aspect_ratio, factor, dit_cfg)
        else:
            width, height = resolve_size(width, height, aspect_ratio, factor)

        defaults = self.defaults
        steps = num_inference_steps if num_inference_steps is not None else defaults.num_inference_steps
        guidance_scale = guidance_scale if guidance_scale is not None else defaults.guidance_scale
        shift = shift if shift is not None else defaults.shift
        do_cfg = not self.is_distilled and guidance_scale > 1

        if use_reprompt:
            prompts = self._reprompt(prompts)

        cond = self._encode(
            prompts, prompt_embeds, prompt_embeds_mask, glyph_embeds, glyph_embeds_mask, bool(dit_cfg.glyph_byT5_v2)
        )
        if do_cfg:
            uncond = self._encode(
                negative_prompts,
                negative_prompt_embeds,
                negative_prompt_embeds_mask,
                negative_glyph_embeds,
                negative_glyph_embeds_mask,
                bool(dit_cfg.glyph_byT5_v2),
            )
        cond = self._repeat(cond, num_images_per_prompt)
        image_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]

        if self.parallel is not None and seed is None and generator is None:
            seed = self.parallel.shared_seeds(batch)  # the ranks of one image draw the same noise
        generators, seeds = make_generators(batch, seed, generator)
        compute_dtype = autocast_dtype(dit)
        if latents is None:
            shape = latent_shape(batch, dit_cfg.in_channels, height, width, factor, len(dit_cfg.patch_size))
            latents = initial_noise(shape, generators, compute_dtype or torch.float32, self.device)
        else:
            latents = latents.to(self.device)
            seeds = [None] * batch

        if do_cfg:
            uncond = self._repeat(uncond, num_images_per_prompt)
            conditioning = self._cfg_batch(uncond, cond)
            guider = Guidance(self.guidance, guidance_scale, cond.ocr_mask)
        else:
            conditioning, guider = cond, None

        latents = self._denoise(
            dit, latents, conditioning, steps, shift, guidance_scale, guider, compute_dtype, callback
        )
        if output_type == "latent":
            return latents

        images = self._decode(vae, latents)
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
            )
        images = format_images(images, output_type)
        if output_type == "pil" and batch == 1:
            return images[0]
        return HunyuanImageOutput(images=images, prompts=image_prompts, seeds=seeds)

    # Inputs.
    def _prompts(
        self, prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None, use_reprompt: bool
    ) -> list[str | None]:
        if prompt is None and prompt_embeds is None:
            raise ValueError(
                "pass `prompt` (a string or a list of strings) or `prompt_embeds` with `prompt_embeds_mask`"
            )
        if use_reprompt and prompt is None:
            raise ValueError("use_reprompt=True rewrites `prompt` text; it cannot rewrite precomputed `prompt_embeds`")
        if prompt is None:
            return [None] * prompt_embeds.shape[0]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("`prompt` must be a string or a non-empty list of strings")
        if prompt_embeds is not None and prompt_embeds.shape[0] != len(prompts):
            raise ValueError(
                f"`prompt` has {len(prompts)} entries but `prompt_embeds` has batch {prompt_embeds.shape[0]}"
            )
        return prompts

    @staticmethod
    def _size_from_latents(
        latents: torch.Tensor,
        batch: int,
        width: int | None,
        height: int | None,
        aspect_ratio: str | None,
        factor: int,
        dit_cfg: Any,
    ) -> tuple[int, int]:
        expected_ndim = 2 + len(dit_cfg.patch_size)
        if latents.ndim != expected_ndim or latents.shape[0] != batch or latents.shape[1] != dit_cfg.in_channels:
            raise ValueError(
                f"`latents` must be ({batch}, {dit_cfg.in_channels}, {'1, ' if expected_ndim == 5 else ''}h, w) for "
                f"{batch} images; got {tuple(latents.shape)}"
            )
        size = (latents.shape[-1] * factor, latents.shape[-2] * factor)
        if aspect_ratio is not None or width is not None or height is not None:
            asked = resolve_size(width, height, aspect_ratio, factor)
            if asked != size:
                raise ValueError(
                    f"`latents` are for {size[0]}x{size[1]} images but {asked[0]}x{asked[1]} was asked for"
                )
        return size

    def _reprompt(self, prompts: list[str]) -> list[str]:
        if not self.parts.given("reprompt_model"):
            raise ValueError(
                "use_reprompt=True needs a `reprompt_model`; pass one to the pipeline or load it with from_pretrained"
            )
        model = self.reprompt_model
        with running(self.memory, model):
            rewritten = [model.rewrite(p) for p in prompts]
        for before, after in zip(prompts, rewritten):
            logger.info(f"reprompt: {before!r} -> {after!r}")
        return rewritten

    def _encode(
        self,
        prompts: list[str | None],
        embeds: torch.Tensor | None,
        mask: torch.Tensor | None,
        glyph: torch.Tensor | None,
        glyph_mask: torch.Tensor | None,
        use_glyph: bool,
    ) -> _Conditioning:
        """Text (and glyph) embeddings for a list of prompts, encoding only what was not given."""
        device = self.device
        if embeds is None:
            if not self.parts.given("text_encoder"):
                raise ValueError(
                    "no `text_encoder` to encode prompts; pass one to the pipeline, or pass `prompt_embeds` and "
                    "`negative_prompt_embeds` (with masks)"
                )
            encoder = self.text_encoder
            with running(self.memory, encoder):
                embeds, mask = encoder.encode(prompts)
        if use_glyph and glyph is None:
            glyph, glyph_mask = self._encode_glyph(prompts)
        if not use_glyph:
            glyph = glyph_mask = None
        ocr_mask = (
            glyph_mask.bool().any(dim=1).cpu()
            if glyph_mask is not None
            else torch.zeros(len(prompts), dtype=torch.bool)
        )
        return _Conditioning(
            text=embeds.to(device),
            text_mask=mask.to(device),
            glyph=None if glyph is None else glyph.to(device),
            glyph_mask=None if glyph_mask is None else glyph_mask.to(device),
            ocr_mask=ocr_mask,
        )

    def _encode_glyph(self, prompts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """ByT5 glyph embeddings; an empty prompt (the default negative) needs no encoder: zeros, no valid token."""
        if all(not p for p in prompts):
            n = len(prompts)
            return torch.zeros(n, GLYPH_LENGTH, GLYPH_DIM), torch.zeros(n, GLYPH_LENGTH, dtype=torch.int64)
        if not self.parts.given("glyph_encoder"):
            raise ValueError(
                "this DiT reads glyph (ByT5) embeddings but no `glyph_encoder` was given; pass one, or pass "
                "`glyph_embeds`/`glyph_embeds_mask` (and the negative ones)"
            )
        encoder = self.glyph_encoder
        with running(self.memory, encoder):
            return encoder.encode(["" if p is None else p for p in prompts])

    @staticmethod
    def _repeat(c: _Conditioning, times: int) -> _Conditioning:
        if times == 1:
            return c

        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat_interleave(times, dim=0)

        return _Conditioning(rep(c.text), rep(c.text_mask), rep(c.glyph), rep(c.glyph_mask), rep(c.ocr_mask))

    @staticmethod
    def _cfg_batch(uncond: _Conditioning, cond: _Conditioning) -> _Conditioning:
        """One batch [unconditional; conditional] so CFG takes a single DiT forward per step."""
        text, text_mask = cat_padded((uncond.text, uncond.text_mask), (cond.text, cond.text_mask))
        glyph = glyph_mask = None
        if cond.glyph is not None:
            glyph, glyph_mask = cat_padded((uncond.glyph, uncond.glyph_mask), (cond.glyph, cond.glyph_mask))
        return _Conditioning(text, text_mask, glyph, glyph_mask, cond.ocr_mask)

    # Denoising.
    def _denoise(
        self,
        dit: torch.nn.Module,
        latents: torch.Tensor,
        c: _Conditioning,
        steps: int,
        shift: float,
        guidance_scale: float,
        guider: Guidance | None,
        compute_dtype: torch.dtype | None,
        callback: StepCallback | None,
    ) -> torch.Tensor:
        device = self.device
        sigmas = shifted_sigmas(steps, shift).to(device)
        timesteps = timesteps_from_sigmas(sigmas)
        timesteps_r = meanflow_timesteps_r(timesteps) if dit.config.use_meanflow else None
        copies = 2 if guider is not None else 1
        with running(self.memory, dit), parallel_forward(self.parallel, dit, guider is not None) as forward:
            for i, t in enumerate(tqdm(timesteps, desc="Denoising", disable=not self.progress_bar)):
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
                latents = after_step(callback, i, t, latents)
        return latents

    # Output.
    def _decode(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images (B, 3, H, W) in [0, 1], undoing the VAE's scaling and shift as the official does."""
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
    ) -> torch.Tensor:
        """The refiner stage on decoded images, handed over as 8-bit (official) or float images."""
        refiner = self.refiner_pipeline
        if refiner.device != self.device:
            refiner.to(self.device)
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
            output_type="pt",
        )
        return refined.images
