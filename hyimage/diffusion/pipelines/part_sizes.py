"""Host bytes of each part of a checkpoint tree as the pipeline loader builds it, counted without reading weights.

The memory plan's host figures (`hyimage.offload.planner.plan_host`) use them for the tree actually loaded (a
fine-tune, a scaled or tiny test tree) instead of the released sizes: the DiTs are counted on their meta build
(`dit_part`) at the dtype the loader gives them, the text encoder's language model from its config.json
(`language_model`, the layers the encoder builds), the VAEs on their meta build from config.json, and the glyph
encoder and the reprompt model as their files (they load in the dtype they are stored in). Reading a part costs
about one tensor on top of it, except an FP8 DiT quantized while loading from its bf16 file (see
QUANTIZE_ON_LOAD_PEAK).
"""

import json
from pathlib import Path
from typing import Any

import torch

import hyimage.models as models
from hyimage.checkpoints.layout import CheckpointLayout
from hyimage.loading.vae_loader import CONFIG_FILE, build_on_meta, read_vae_config
from hyimage.models.dit.configs import resolve_dit_config
from hyimage.offload.dit_weights import dit_part
from hyimage.offload.weights import language_model
from hyimage.stages import DIT, GLYPH_ENCODER, REFINER_DIT, REFINER_VAE, REPROMPT, TEXT_ENCODER, VAE_DECODE
from hyimage.text_encoders.mllm import HIDDEN_STATE_SKIP_LAYER

QUANTIZE_ON_LOAD_PEAK = 0.69
"""Peak RSS growth while an FP8 DiT is quantized from its bf16 file, as a share of that file's size (0.689 measured
by benchmarks/bench_dit_load_memory.py)."""


def part_host_bytes(
    layout: CheckpointLayout,
    variant: str,
    config: Any,
    refiner_config: Any,
    fp8: bool,
    dit_dtype: torch.dtype,
    text_encoder_dtype: torch.dtype | None,
    reprompt: str | None,
    device: torch.device,
    dit_file: Path | None = None,
    base: bool = True,
) -> dict[str, tuple[int, int]]:
    """Per stage of the memory plan, the host bytes of its part once loaded for `device`, and while it loads (a
    DiT from `dit_file`, another format, is left to the planner's own count; `base=False`: the refiner alone, so
    the base model's stages hold nothing)."""
    cuda = torch.device(device).type == "cuda"
    sizes = {} if dit_file is not None else {DIT: dit_bytes(variant if config is None else config, fp8, dit_dtype)}
    text_dtype = text_encoder_dtype or (torch.bfloat16 if cuda else torch.float32)
    sizes[TEXT_ENCODER] = text_encoder_bytes(layout.text_encoder / "config.json", text_dtype.itemsize)
    glyph = _files(layout.glyph_diffusers[0], "*.safetensors") or _files(layout.glyph / "checkpoints", "*.pt")
    if glyph:
        sizes[GLYPH_ENCODER] = glyph
    sizes[VAE_DECODE] = vae_bytes("HunyuanVAE2D", layout.vae, None)
    if refiner_config is not None:
        sizes[REFINER_DIT] = dit_bytes(refiner_config, fp8, dit_dtype)
        sizes[REFINER_VAE] = vae_bytes("AutoencoderKLConv3D", layout.refiner_vae, torch.float16 if cuda else None)
    if reprompt is not None and _files(layout.reprompt(reprompt), "*.safetensors"):
        sizes[REPROMPT] = _files(layout.reprompt(reprompt), "*.safetensors")
    loading = {}
    for stage, name in ((DIT, variant), (REFINER_DIT, "hunyuanimage-refiner")):
        if stage in sizes and fp8 and not layout.dit_fp8(name).is_file() and layout.dit(name).is_file():
            loading[stage] = int(QUANTIZE_ON_LOAD_PEAK * layout.dit(name).stat().st_size)
    if not base:
        sizes.update(dit=0, glyph_encoder=0, vae_decode=0)
    return {stage: (size, max(size, loading.get(stage, 0))) for stage, size in sizes.items()}


def dit_bytes(config: Any, fp8: bool, dtype: torch.dtype) -> int:
    """The DiT's weights: FP8 linears at one byte, the rest bf16 (FP8) or `dtype`."""

    total = dit_part(resolve_dit_config(config), fp8).total  # bf16 besides the FP8 weights
    return total if fp8 else total * dtype.itemsize // 2


def text_encoder_bytes(config_file: Path, itemsize: int) -> int:
    """The language model layers the text encoder builds, and its token embeddings."""

    raw = json.loads(config_file.read_text())
    c = {**raw, **raw.get("text_config", {})}
    sizes = dict(hidden=c["hidden_size"], intermediate=c["intermediate_size"], heads=c["num_attention_heads"],
                 kv_heads=c["num_key_value_heads"], vocab=c["vocab_size"])
    layers = c["num_hidden_layers"] - HIDDEN_STATE_SKIP_LAYER
    return language_model(sizes, layers, lm_head=False, itemsize=itemsize).total


def vae_bytes(name: str, directory: Path, dtype: torch.dtype | None) -> int:
    """The VAE's parameters built on meta from its config.json, in `dtype` (None: float32, as released)."""

    model_cls = getattr(models, name)
    path = directory / CONFIG_FILE
    model = build_on_meta(model_cls, read_vae_config(path, model_cls)[0], path)
    itemsize = (dtype or torch.float32).itemsize
    return sum(t.numel() * itemsize for t in (*model.parameters(), *model.buffers()))


def _files(directory: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in directory.glob(pattern)) if directory.is_dir() else 0
