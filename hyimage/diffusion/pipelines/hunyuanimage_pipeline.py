"""HunyuanImage-2.1 text-to-image: prompts -> embeddings -> flow-matching loop over the DiT -> VAE decode.

Numbers follow the official pipeline (schedule, Euler step, MeanFlow, guidance embedding, MIX_mode_0
guidance); unlike it, a call takes batches of prompts and images, and the guidance state is per call.
"""

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger
from PIL import Image
from tqdm import tqdm

from hyimage.diffusion.guidance import Guidance, GuidanceConfig
from hyimage.diffusion.padding import trim_padding
from hyimage.diffusion.pipelines.finite import check_finite
from hyimage.diffusion.pipelines.parts import (
    Parts,
    as_list,
    autocast_dtype,
    cat_padded,
    check_embedding_widths,
    decode_to_images,
    format_images,
    running,
    step_hook,
    to_arguments,
    to_uint8,
)
from hyimage.diffusion.request import (
    EMBEDDING_NAMES,
    RequestError,
    check_device,
    check_request,
    plain_seed,
    refuse_unknown_keywords,
)
from hyimage.diffusion.sampling import (
    StepCallback,
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
HOST_STAGES = {
    "reprompt_model": "reprompt",
    "text_encoder": "text_encoder",
    "glyph_encoder": "glyph_encoder",
    "dit": "dit",
    "vae": "vae_decode",
}
"""The memory plan's stage of each part (see `hyimage.offload.host`)."""


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
    """Images of one call and what produced each: the prompt as used (after reprompting) and its seed.

    Indexable as diffusers' outputs are: `out[0]` and `out["images"]` are `out.images`."""

    images: list[Image.Image] | Any
    prompts: list[str | None]
    seeds: list[int | None]

    def to_tuple(self) -> tuple:
        return (self.images, self.prompts, self.seeds)

    def __getitem__(self, key: int | slice | str) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __len__(self) -> int:
        return 3


def call_output(
    images: Any,
    prompts: list[str | None],
    seeds: list[int | None],
    output_type: str,
    return_dict: bool | None,
    batch: int,
) -> Any:
    """The official return (a PIL image for one image, a tensor for latents) unless `return_dict` is set."""
    output = HunyuanImageOutput(images=images, prompts=prompts, seeds=seeds)
    if return_dict is None:
        if output_type == "latent":
            return images
        return images[0] if output_type == "pil" and batch == 1 else output
    return output if return_dict else output.to_tuple()


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
        self.memory.host.register(self.parts, HOST_STAGES)
        self.guidance = guidance if guidance is not None else GuidanceConfig()
        self.progress_bar = progress_bar
        self.parallel = parallel_state(parallel)  # hyimage.parallel: None, a ParallelConfig or a ParallelState

    @classmethod
    def from_pretrained(
        cls, model_name_or_path: str | Any = None, use_fp8: bool = False, **kwargs: Any
    ) -> "HunyuanImagePipeline":
        """Build the pipeline from a variant name ($HUNYUANIMAGE_V2_1_MODEL_ROOT, default ./ckpts) or a local
        `ckpts/` folder; keywords as `hyimage.loading.pipeline_loader.load_pipeline` (official ones included)."""
        from hyimage.loading.pipeline_loader import pipeline_from_pretrained

        return pipeline_from_pretrained(cls, model_name_or_path, use_fp8, kwargs)

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
            width, height = self._size_from_latents(latents, batch, width, height, aspect_ratio, factor, dit_cfg)
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
        refiner_text = self._encode_for_refiner(image_prompts) if use_refiner and output_type != "latent" else None
        cond = self._repeat(cond, num_images_per_prompt)

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
            uncond = self._repeat(uncond, num_images_per_prompt)
            conditioning = self._cfg_batch(uncond, cond)
            guider = Guidance(self.guidance, guidance_scale, cond.ocr_mask)
        else:
            conditioning, guider = cond, None

        hook = step_hook(self, callback, callback_on_step_end, callback_on_step_end_tensor_inputs)
        latents = self._denoise(latents, conditioning, steps, shift, guidance_scale, guider, compute_dtype, hook)
        check_finite(
            latents,
            "denoising",
            "NaN/Inf weights in the DiT checkpoint (load with verify=True to name the tensor), non-finite `latents` "
            "passed in, a callback that returned them, or a half-precision overflow",
        )
        if output_type == "latent":
            return call_output(latents, image_prompts, seeds, output_type, return_dict, batch)

        images = self._decode(latents)
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
            encoder = self.text_encoder
            with running(self.memory, encoder):
                embeds, mask = encoder.encode(prompts)
            check_finite(
                embeds, "the text encoder", "NaN/Inf weights in the text encoder checkpoint (text_encoder/llm)"
            )
        else:
            check_finite(embeds, "the text embeddings given", "the `prompt_embeds` passed in hold NaN or Inf")
        if use_glyph and glyph is None:
            glyph, glyph_mask = self._encode_glyph(prompts)
            check_finite(
                glyph, "the glyph encoder", "NaN/Inf weights in the glyph checkpoint (text_encoder/Glyph-SDXL-v2)"
            )
        elif use_glyph:
            check_finite(glyph, "the glyph embeddings given", "the `glyph_embeds` passed in hold NaN or Inf")
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
        latents: torch.Tensor,
        c: _Conditioning,
        steps: int,
        shift: float,
        guidance_scale: float,
        guider: Guidance | None,
        compute_dtype: torch.dtype | None,
        hook: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        device, dit = self.device, self.dit
        sigmas = shifted_sigmas(steps, shift)
        host_timesteps = timesteps_from_sigmas(sigmas).tolist()  # for the callback: no device read per step
        sigmas = sigmas.to(device)
        timesteps = timesteps_from_sigmas(sigmas)
        timesteps_r = meanflow_timesteps_r(timesteps) if dit.config.use_meanflow else None
        copies = 2 if guider is not None else 1
        c.text, c.text_mask = trim_padding(c.text, c.text_mask)
        if c.glyph is not None:
            c.glyph, c.glyph_mask = trim_padding(c.glyph, c.glyph_mask)
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
                latents = hook(i, t, latents, host_timesteps[i])
        return latents

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
