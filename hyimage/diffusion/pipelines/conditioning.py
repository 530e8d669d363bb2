"""What the DiT reads besides latents and time, batched as the denoising loop feeds it."""

from dataclasses import dataclass
from typing import Any

import torch

from hyimage.diffusion.pipelines.finite import check_finite
from hyimage.diffusion.pipelines.parts import cat_padded, running

GLYPH_LENGTH = 128
GLYPH_DIM = 1472


@dataclass
class Conditioning:
    """Everything the DiT reads besides latents and time, batched as the loop feeds it."""

    text: torch.Tensor
    text_mask: torch.Tensor
    glyph: torch.Tensor | None
    glyph_mask: torch.Tensor | None
    ocr_mask: torch.Tensor


def empty_glyph(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The glyph embeddings of `n` prompts without quoted text: zeros, no valid token."""
    return torch.zeros(n, GLYPH_LENGTH, GLYPH_DIM), torch.zeros(n, GLYPH_LENGTH, dtype=torch.int64)


def repeat_conditioning(c: Conditioning, times: int) -> Conditioning:
    if times == 1:
        return c

    def rep(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.repeat_interleave(times, dim=0)

    return Conditioning(rep(c.text), rep(c.text_mask), rep(c.glyph), rep(c.glyph_mask), rep(c.ocr_mask))


def cfg_batch(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """One batch [unconditional; conditional] so CFG takes a single DiT forward per step."""
    text, text_mask = cat_padded((uncond.text, uncond.text_mask), (cond.text, cond.text_mask))
    glyph = glyph_mask = None
    if cond.glyph is not None:
        glyph, glyph_mask = cat_padded((uncond.glyph, uncond.glyph_mask), (cond.glyph, cond.glyph_mask))
    return Conditioning(text, text_mask, glyph, glyph_mask, cond.ocr_mask)


def encode_conditioning(
    pipe: Any,
    prompts: list[str | None],
    embeds: torch.Tensor | None,
    mask: torch.Tensor | None,
    glyph: torch.Tensor | None,
    glyph_mask: torch.Tensor | None,
    use_glyph: bool,
) -> Conditioning:
    """Text (and glyph) embeddings of `pipe`'s encoders for a list of prompts, encoding only what was not given."""
    device = pipe.device
    if embeds is None:
        encoder = pipe.text_encoder
        with running(pipe.memory, encoder):
            embeds, mask = encoder.encode(prompts)
        check_finite(
            embeds, "the text encoder", "NaN/Inf weights in the text encoder checkpoint (text_encoder/llm)"
        )
    else:
        check_finite(embeds, "the text embeddings given", "the `prompt_embeds` passed in hold NaN or Inf")
    if use_glyph and glyph is None:
        glyph, glyph_mask = encode_glyph(pipe, prompts)
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
    return Conditioning(
        text=embeds.to(device),
        text_mask=mask.to(device),
        glyph=None if glyph is None else glyph.to(device),
        glyph_mask=None if glyph_mask is None else glyph_mask.to(device),
        ocr_mask=ocr_mask,
    )


def encode_glyph(pipe: Any, prompts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """ByT5 glyph embeddings; an empty prompt (the default negative) needs no encoder: zeros, no valid token."""
    if all(not p for p in prompts):
        n = len(prompts)
        return empty_glyph(n)
    if not pipe.parts.given("glyph_encoder"):
        raise ValueError(
            "this DiT reads glyph (ByT5) embeddings but no `glyph_encoder` was given; pass one, or pass "
            "`glyph_embeds`/`glyph_embeds_mask` (and the negative ones)"
        )
    encoder = pipe.glyph_encoder
    with running(pipe.memory, encoder):
        return encoder.encode(["" if p is None else p for p in prompts])
