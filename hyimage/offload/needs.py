"""What each stage of a request needs: its part's weights, its activation peak, its host bytes.

Weights are exact where the part is built on `meta` (the DiTs, FP8 linears included, counted per block); the VAEs'
counts are the released manifests'; the Qwen2.5-VL language models' come from their configurations (checked against
meta builds in tests/test_memory_plan.py); the ByT5 glyph encoder, the 32B's vision tower and the 7B reprompt model
(whose configuration was not seen) are approximate.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from hyimage.cache.memory import cache_bytes
from hyimage.offload.activations import (
    EXACT_TILES,
    TEMPLATE_TOKENS,
    TEXT_TOKENS,
    dit_activation_bytes,
    dit_tokens,
    exact_vae_activation_bytes,
    exact_vae_host_bytes,
    format_activation_bytes,
    reprompt_activation_bytes,
    text_activation_bytes,
    vae_activation_bytes,
)
from hyimage.offload.dit_weights import dit_weights
from hyimage.offload.request import PlanRequest, base_dit_weights, dit_config
from hyimage.offload.weights import Part, language_model
from hyimage.stages import DIT, GLYPH_ENCODER, REFINER_DIT, REFINER_VAE, REPROMPT, TEXT_ENCODER, VAE_DECODE

# Parts whose sizes come from their released configurations (see the module docstring).
QWEN25VL_7B = dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064, layers=28)


TEXT_ENCODER_LAYERS = QWEN25VL_7B["layers"] - 2  # the last two decoder layers are never built (mllm.py)


QWEN25VL_32B = dict(hidden=5120, intermediate=27648, heads=40, kv_heads=8, vocab=152064, layers=64)


QWEN25VL_32B_VISION_PARAMS = 676_550_144  # the vision tower of Qwen2.5-VL-32B (loaded, not run on text)


HUNYUAN_7B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128167, layers=32)
"""The 7B PromptEnhancer's published Hunyuan-7B-Instruct configuration (its folder's config was not seen)."""


GLYPH_PARAMS = 218_000_000  # ByT5-small's encoder with the Glyph-SDXL-v2 token table, float32


VAE_PARAMS = {VAE_DECODE: 405_575_491, REFINER_VAE: 1_260_634_115}  # the released manifests' num_params


# The plan.
@dataclass
class Need:
    stage: str
    part: Part
    activations: int
    host: int
    streamable: bool
    exact: list[tuple[bool, int, int]] = field(default_factory=list)
    """A VAE's exact tiled settings, fastest first: (activations on the GPU, tile side, activation bytes)."""
    exact_host: int = 0
    """Pinned host bytes of the exact tiled VAE when its activations live on the host."""


def exact_options(stage: str, request: PlanRequest) -> dict[str, Any]:
    options = [(gpu, tile, exact_vae_activation_bytes(stage, request, tile, gpu)) for gpu, tile in EXACT_TILES]
    return {"exact": options, "exact_host": exact_vae_host_bytes(stage, request)}


def stage_needs(request: PlanRequest) -> list[Need]:
    needs: list[Need] = []
    if request.reprompt == "32b":
        part = language_model(QWEN25VL_32B, QWEN25VL_32B["layers"], lm_head=True, extra=QWEN25VL_32B_VISION_PARAMS)
        needs.append(Need(REPROMPT, part, reprompt_activation_bytes(QWEN25VL_32B), part.total, True))
    elif request.reprompt == "7b":
        part = language_model(HUNYUAN_7B, HUNYUAN_7B["layers"], lm_head=False)
        needs.append(Need(REPROMPT, part, reprompt_activation_bytes(HUNYUAN_7B), part.total, True))
    text = language_model(QWEN25VL_7B, TEXT_ENCODER_LAYERS, lm_head=False)
    needs.append(Need(TEXT_ENCODER, text, text_activation_bytes(QWEN25VL_7B, TEXT_TOKENS + TEMPLATE_TOKENS),
                       text.total, True))
    base = dit_config(request)
    if base.glyph_byT5_v2:
        glyph = Part(GLYPH_PARAMS * 4)
        needs.append(Need(GLYPH_ENCODER, glyph, 64 * 1024**2, glyph.total, False))
    distilled = bool(base.guidance_embed)
    weights = base_dit_weights(request)
    dit = weights.part
    batch = 1 if distilled else 2  # classifier-free guidance runs the base model on a batch of two
    tokens = dit_tokens(request)
    activations = dit_activation_bytes(base, batch, *tokens, weights.fp8) + step_cache_bytes(request.cache, base, batch,
                                                                                               tokens)
    needs.append(Need(DIT, dit, activations + format_activation_bytes(weights, base, batch, sum(tokens)),
                       dit.total, True))
    vae = Part(VAE_PARAMS[VAE_DECODE] * 4)
    needs.append(Need(VAE_DECODE, vae, vae_activation_bytes(VAE_DECODE, request, 4), vae.total, False,
                       **exact_options(VAE_DECODE, request)))
    if request.refiner:
        refiner_config = dit_config(request, refiner=True)
        refiner_weights = dit_weights(refiner_config, request.fp8, None, None, request.refiner_loras)
        refiner, refiner_tokens = refiner_weights.part, dit_tokens(request, True)
        activations = dit_activation_bytes(refiner_config, 1, *refiner_tokens, request.fp8)
        activations += format_activation_bytes(refiner_weights, refiner_config, 1, sum(refiner_tokens))
        activations += step_cache_bytes(request.refiner_cache, refiner_config, 1, refiner_tokens)
        needs.append(Need(REFINER_DIT, refiner, activations, refiner.total, True))
        refiner_vae = Part(VAE_PARAMS[REFINER_VAE] * 2)  # fp16 on the GPU, as the official
        needs.append(Need(REFINER_VAE, refiner_vae, vae_activation_bytes(REFINER_VAE, request, 2),
                           VAE_PARAMS[REFINER_VAE] * 4, False, **exact_options(REFINER_VAE, request)))
    return needs


def step_cache_bytes(cache: tuple[str, tuple] | None, config: Any, batch: int, tokens: tuple[int, int]) -> int:
    """What a step cache (`hyimage.cache`) keeps on the GPU during its DiT stage, in the compute dtype (bf16)."""
    if cache is None:
        return 0
    kind, options = cache
    features = config.out_channels * math.prod(config.patch_size)
    return cache_bytes(kind, dict(options), batch, *tokens, config.hidden_size, 2, features)
