"""Pipeline parts given as objects or as zero-argument factories, and the checks and conversions both pipelines share."""

import functools
import inspect
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from PIL import Image

from hyimage.offload import MemoryManager


def is_factory(part: Any) -> bool:
    """True for a zero-argument factory (function, method, partial or class) rather than a built part."""
    return inspect.isfunction(part) or inspect.ismethod(part) or isinstance(part, (functools.partial, type))


class Parts:
    """Named parts, each built on first use when it was given as a factory, then kept."""

    def __init__(self, **parts: Any) -> None:
        self._parts = dict(parts)

    def get(self, name: str) -> Any:
        part = self._parts[name]
        if is_factory(part):
            part = part()
            self._parts[name] = part
        return part

    def given(self, name: str) -> bool:
        return self._parts.get(name) is not None

    def loaded(self, name: str) -> Any | None:
        """The part if it is built already, else None (does not build it)."""
        part = self._parts.get(name)
        return None if part is None or is_factory(part) else part


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
) -> torch.Tensor:
    """One DiT forward. A half-precision DiT runs under autocast on CUDA as the official pipeline does; on
    other devices (whose autocast does not cover mixed-dtype norms) its float inputs are cast to its dtype.
    Timesteps and guidance stay float32 either way."""
    kwargs = dict(
        byt5_text_states=byt5_text_states, byt5_text_mask=byt5_text_mask, guidance=guidance, timesteps_r=timesteps_r
    )
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


def check_embeds(embeds: torch.Tensor | None, mask: torch.Tensor | None, name: str, batch: int | None) -> None:
    """An embedding tensor needs its mask, of matching batch and length."""
    if embeds is None:
        if mask is not None:
            raise ValueError(f"`{name}_mask` was given without `{name}`; pass both or neither")
        return
    if mask is None:
        raise ValueError(
            f"`{name}` was given without `{name}_mask`; pass the attention mask the encoder returned with it "
            "(1 for valid tokens, 0 for padding)"
        )
    if embeds.ndim != 3 or mask.ndim != 2 or mask.shape != embeds.shape[:2]:
        raise ValueError(
            f"`{name}` must be (batch, length, dim) and `{name}_mask` (batch, length); got {tuple(embeds.shape)} and {tuple(mask.shape)}"
        )
    if batch is not None and embeds.shape[0] != batch:
        raise ValueError(f"`{name}` has batch {embeds.shape[0]} but there are {batch} prompts")


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


def check_output_type(output_type: str) -> None:
    """A pipeline call returns images as "pil", "np" or "pt", or the final latents for "latent"."""
    if output_type not in ("pil", "np", "pt", "latent"):
        raise ValueError(f"output_type {output_type!r} is unknown; choose one of 'pil', 'np', 'pt', 'latent'")


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
