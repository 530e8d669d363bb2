"""Pipeline parts given as objects or as zero-argument factories, and the checks and conversions both pipelines share."""

import functools
import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from PIL import Image

from hyimage.diffusion.request import check_dtype
from hyimage.diffusion.sampling import StepCallback, after_step
from hyimage.errors import RequestError, RequestTypeError
from hyimage.models.dit.model import BYT5_DIM
from hyimage.offload import MemoryManager
from hyimage.quantization.fp8 import FP8Linear


def is_factory(part: Any) -> bool:
    """True for a zero-argument factory (function, method, partial or class) rather than a built part."""
    return inspect.isfunction(part) or inspect.ismethod(part) or isinstance(part, (functools.partial, type))


class Parts:
    """Named parts, each built on first use when it was given as a factory, then kept until released.

    A factory may carry `config`, a zero-argument function giving the part's configuration without building it.
    `before_build(name)`, when set, runs before a part is built (the host memory plan releases parts there)."""

    def __init__(self, **parts: Any) -> None:
        self._parts = dict(parts)
        self._factories = {name: part for name, part in parts.items() if is_factory(part)}
        self.dtype: torch.dtype | None = None
        self.before_build: Callable[[str], None] | None = None

    def get(self, name: str) -> Any:
        part = self._parts[name]
        if is_factory(part):
            if self.before_build is not None:
                self.before_build(name)
            part = part()
            self._parts[name] = part
            if self.dtype is not None and isinstance(part, torch.nn.Module):
                cast_floating(part, self.dtype)
        return part

    def config(self, name: str) -> Any:
        """The part's `config`, from its factory when it has not been built (else the built part's)."""
        part = self._parts[name]
        if is_factory(part) and callable(getattr(part, "config", None)):
            return part.config()
        return self.get(name).config

    def release(self, name: str) -> bool:
        """Drop the built part `name`: its factory builds it again when next needed. False when there is nothing
        to release (not built, or given built, so that it could not be built again)."""
        factory = self._factories.get(name)
        if factory is None or is_factory(self._parts[name]):
            return False
        self._parts[name] = factory
        if callable(getattr(factory, "release", None)):
            factory.release()
        return True

    def cast(self, dtype: torch.dtype) -> None:
        """Cast the built parts' floating weights to `dtype` now, and the others when they are built."""
        self.dtype = dtype
        for part in self._parts.values():
            if isinstance(part, torch.nn.Module):
                cast_floating(part, dtype)

    def given(self, name: str) -> bool:
        return self._parts.get(name) is not None

    def loaded(self, name: str) -> Any | None:
        """The part if it is built already, else None (does not build it)."""
        part = self._parts.get(name)
        return None if part is None or is_factory(part) else part


def cast_floating(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """`module.to(dtype)` for its floating parameters and buffers, except FP8-stored weights and their scales."""
    for sub in module.modules():
        keep = ("weight", "weight_scale") if isinstance(sub, FP8Linear) else ()
        for tensors in (sub._parameters, sub._buffers):
            for name, tensor in tensors.items():
                if tensor is None or name in keep or not tensor.is_floating_point() or tensor.dtype == dtype:
                    continue
                if tensor.element_size() == 1:
                    continue
                converted = tensor.data.to(dtype)
                if isinstance(tensor, torch.nn.Parameter):
                    tensors[name] = torch.nn.Parameter(converted, requires_grad=tensor.requires_grad)
                else:
                    tensors[name] = converted


def to_arguments(args: Sequence[Any], device: Any = None, dtype: Any = None) -> tuple[Any, torch.dtype | None]:
    """`pipe.to` arguments as diffusers takes them: a device, a dtype, or both, positionally or by keyword."""
    for arg in args:
        if isinstance(arg, torch.dtype):
            if dtype is not None:
                raise RequestTypeError("dtype", "pipe.to() got two dtypes; pass one")
            dtype = arg
        elif isinstance(arg, (str, torch.device)):
            if device is not None:
                raise RequestTypeError("device", "pipe.to() got two devices; pass one")
            device = arg
        else:
            raise RequestTypeError(
                "device", f"pipe.to() takes a device ('cuda', 'cpu') and/or a dtype (torch.bfloat16), got {arg!r}"
            )
    return device, None if dtype is None else check_dtype(dtype)


def step_hook(
    pipe: Any,
    callback: StepCallback | None,
    callback_on_step_end: Callable[..., dict] | None,
    tensor_inputs: Sequence[str],
) -> Callable[..., torch.Tensor]:
    """The per-step user hooks: `callback(step, timestep, latents)` and diffusers'
    `callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict` (its "latents" replace the latents)."""

    def hook(
        step: int, timestep: torch.Tensor, latents: torch.Tensor, host_timestep: float | None = None
    ) -> torch.Tensor:
        # `callback` gets the timestep as a float: the host copy, when given, spares a device read per step
        latents = after_step(callback, step, timestep if host_timestep is None else host_timestep, latents)
        if callback_on_step_end is not None:
            outputs = callback_on_step_end(pipe, step, timestep, {name: latents for name in tensor_inputs})
            if outputs is not None:
                latents = outputs.get("latents", latents)
        return latents

    return hook


def running(memory: MemoryManager, part: Any) -> AbstractContextManager:
    """`memory.running(part)` for parts that can be moved; a no-op context for the others."""
    if isinstance(part, torch.nn.Module) or hasattr(part, "to"):
        return memory.running(part)
    return nullcontext(part)


def autocast_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The half-precision dtype a module computes in, or None for float32. FP8 weights are dequantized into
    the dtype of the module's other tensors (bf16 as released, float32 when loaded with dtype=torch.float32)."""
    dtypes = {p.dtype for p in module.parameters()}
    for dtype in (torch.bfloat16, torch.float16):
        if dtype in dtypes:
            return dtype
    return None


def run_dit(
    dit: torch.nn.Module,
    compute_dtype: torch.dtype | None,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    text_states: torch.Tensor,
    text_mask: torch.Tensor,
    byt5_text_states: torch.Tensor | None = None,
    byt5_text_mask: torch.Tensor | None = None,
    guidance: torch.Tensor | None = None,
    timesteps_r: torch.Tensor | None = None,
    block_cache: Callable | None = None,
) -> torch.Tensor:
    """One DiT forward. A half-precision DiT runs under autocast on CUDA as the official pipeline does; on
    other devices (whose autocast does not cover mixed-dtype norms) its float inputs are cast to its dtype.
    Timesteps and guidance stay float32 either way. `block_cache`: a step cache's block runner (`hyimage.cache`)."""
    kwargs = dict(
        byt5_text_states=byt5_text_states, byt5_text_mask=byt5_text_mask, guidance=guidance, timesteps_r=timesteps_r
    )
    if block_cache is not None:
        kwargs["block_cache"] = block_cache
    if compute_dtype is None:
        return dit(hidden_states, timestep, text_states, text_mask, **kwargs)
    if hidden_states.device.type == "cuda":
        with torch.autocast("cuda", dtype=compute_dtype):
            return dit(hidden_states, timestep, text_states, text_mask, **kwargs)
    kwargs["byt5_text_states"] = None if byt5_text_states is None else byt5_text_states.to(compute_dtype)
    return dit(hidden_states.to(compute_dtype), timestep, text_states.to(compute_dtype), text_mask, **kwargs)


def decode_to_images(memory: MemoryManager, vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE-space latents (B, C, T, h, w) through `vae.decode` on the execution device to images (B, 3, H, W) in
    [0, 1] (the first frame)."""
    with running(memory, vae):
        image = vae.decode(latents.to(memory.device, module_dtype(vae)), return_dict=False)[0]
    if image.ndim == 5:
        image = image[:, :, 0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def module_dtype(module: Any) -> torch.dtype:
    """The floating dtype of a module's first floating parameter (float32 if none)."""
    for p in module.parameters():
        if p.dtype.is_floating_point and p.dtype.itemsize > 1:
            return p.dtype
    return torch.float32


def as_list(value: Any, n: int, name: str) -> list:
    """A str (or None) repeated n times, or a list checked to have n entries."""
    if value is None or isinstance(value, str):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(
            f"`{name}` has {len(values)} entries but there are {n} prompts; pass one per prompt or a single string"
        )
    return values


def pad_tokens(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad embeddings with zeros and the mask with 0 to `length` tokens."""
    extra = length - embeds.shape[1]
    if extra <= 0:
        return embeds, mask
    embeds = torch.nn.functional.pad(embeds, (0, 0, 0, extra))
    mask = torch.nn.functional.pad(mask, (0, extra))
    return embeds, mask


def cat_padded(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate two (embeds, mask) batches, padding the shorter sequence."""
    length = max(first[0].shape[1], second[0].shape[1])
    e1, m1 = pad_tokens(*first, length)
    e2, m2 = pad_tokens(*second, length)
    return torch.cat([e1, e2.to(e1.dtype)]), torch.cat([m1, m2.to(m1.dtype)])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] to (B, H, W, 3) uint8, truncating as the official pipeline does."""
    return (images.permute(0, 2, 3, 1).float().cpu() * 255).byte().numpy()


def format_images(images: torch.Tensor, output_type: str) -> Any:
    """Images (B, 3, H, W) in [0, 1] as a list of PIL images, a float (B, H, W, 3) array, or the tensor."""
    if output_type == "pil":
        return [Image.fromarray(a) for a in to_uint8(images)]
    if output_type == "np":
        return images.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "pt":
        return images
    raise ValueError(f"output_type {output_type!r} is unknown; choose one of 'pil', 'np', 'pt', 'latent'")


def check_embedding_widths(dit_config: Any, embeddings: dict[str, torch.Tensor | None]) -> None:
    """Precomputed embeddings must be as wide as the DiT takes them (text_states_dim; the glyph ones 1472), checked
    from the DiT's configuration before anything runs."""
    for name, tensor in embeddings.items():
        if tensor is None or tensor.ndim != 3:
            continue
        expected = BYT5_DIM if "glyph" in name else dit_config.text_states_dim
        if tensor.shape[-1] != expected:
            raise RequestError(
                name,
                f"`{name}` has width {tensor.shape[-1]} (shape {tuple(tensor.shape)}) but the DiT takes "
                f"{expected}-wide {'ByT5 glyph' if 'glyph' in name else 'text'} embeddings; pass embeddings made by "
                "this model's encoder",
            )
