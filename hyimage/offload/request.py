"""What a memory plan is made for (`PlanRequest`), and what the request's DiT weighs in the format it asks for."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hyimage.loading.dit_loader import is_gguf
from hyimage.loading.safetensors_io import SafetensorsReader
from hyimage.lora.keys import ALPHA_SUFFIX, parse_lora
from hyimage.lora.mixin import read_lora_file
from hyimage.models.dit.configs import resolve_dit_config
from hyimage.offload.dit_weights import GGUF_DEQUANT_BYTES, DiTWeights, LoraLayout, dit_on_meta, dit_weights
from hyimage.offload.weights import GIB
from hyimage.variants import DISTILLED, REFINER, TEXT_TO_IMAGE


@dataclass(frozen=True)
class PlanRequest:
    """What a plan is made for: the model, the options a call uses and the image size."""

    variant: str = DISTILLED
    fp8: bool = False
    refiner: bool = True
    reprompt: str | None = None
    width: int = 2048
    height: int = 2048
    dit_config: Any = None
    """The DiT's constructor arguments when not the variant's released ones (a dict, DiTConfig or name)."""
    dit_file: str | None = None
    """The DiT file loaded instead of the variant's (`from_pretrained(dit_file=...)`): a GGUF file's tensors are
    counted from its header; a safetensors file counts as FP8 when it stores float8 weights, else as bf16."""
    gguf: str | None = None
    """A GGUF quantisation type (Q4_K, Q8_0, ...): the DiT estimated as such a file would load (see GGUF_KEPT)."""
    loras: tuple[LoraLayout, ...] = ()
    """LoRAs attached to the DiT (`lora_layout`, `lora_layouts`): their adapters stay on the GPU with the layers."""
    refiner_loras: tuple[LoraLayout, ...] = ()
    cache: tuple[str, tuple[tuple[str, Any], ...]] | None = None
    """The base DiT's step cache (kind, sorted options), as `enable_cache` set it: its tensors count in the DiT stage."""
    refiner_cache: tuple[str, tuple[tuple[str, Any], ...]] | None = None
    """The refiner DiT's step cache, likewise."""
    """LoRAs attached to the refiner's DiT, counted as `loras` are for the base DiT."""
    host_part_bytes: tuple[tuple[str, int, int], ...] | None = None
    """(stage, bytes held once loaded, bytes while loading) of the parts in host memory, when not the released
    sizes read from the official files (the pipeline loader counts them for the checkpoint tree it loads:
    `hyimage.diffusion.pipelines.part_sizes`)."""

    def __post_init__(self) -> None:
        if self.variant not in TEXT_TO_IMAGE:
            raise ValueError(f"variant {self.variant!r} is unknown; choose one of {', '.join(TEXT_TO_IMAGE)}")
        if self.gguf is not None and self.gguf not in GGUF_DEQUANT_BYTES:
            raise ValueError(f"gguf type {self.gguf!r} is unknown; choose one of {', '.join(GGUF_DEQUANT_BYTES)}")
        if self.gguf is not None and self.dit_file is not None:
            raise ValueError("pass either a GGUF type (gguf) or a DiT file (dit_file), not both")
        if self.reprompt not in (None, "7b", "32b"):
            raise ValueError(f"reprompt {self.reprompt!r} is unknown; choose '7b', '32b' or None")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 32 or value % 32:
                raise ValueError(f"{name}={value} must be a positive multiple of 32 (the VAE's factor)")


def dit_config(request: PlanRequest, refiner: bool = False) -> Any:
    if refiner:
        return resolve_dit_config(REFINER)
    return resolve_dit_config(request.dit_config if request.dit_config is not None else request.variant)


def dit_format(request: PlanRequest) -> tuple[bool, str | None, str | None]:
    """(FP8 linears, GGUF type to estimate, DiT file) of the request's base DiT (a file decides its own FP8)."""
    if request.gguf is not None:
        return False, request.gguf, None
    if request.dit_file is None:
        return request.fp8, None, None
    path = Path(request.dit_file)
    if not path.is_file():
        raise FileNotFoundError(f"dit_file {path} does not exist; pass the path of a .safetensors or .gguf DiT")
    return False, None, str(path)


def dit_weights_label(request: PlanRequest) -> str:
    """How the plan's first line names the base DiT's format and the LoRAs of both DiTs."""
    label = ""
    if request.gguf is not None:
        label = f", DiT GGUF {request.gguf} (estimated)"
    elif request.dit_file is not None:
        label = f", DiT {Path(request.dit_file).name}"
    if request.loras:
        label += f", {len(request.loras)} LoRA{'s' if len(request.loras) > 1 else ''}"
    if request.refiner_loras:
        label += f", {len(request.refiner_loras)} refiner LoRA{'s' if len(request.refiner_loras) > 1 else ''}"
    return label


def base_dit_weights(request: PlanRequest) -> DiTWeights:
    """The base DiT's weights for `request`: its format (bf16, FP8, a GGUF file or type) and its LoRAs."""
    fp8, gguf, dit_file = dit_format(request)
    return dit_weights(dit_config(request), fp8, gguf, dit_file, request.loras)


def dit_summary(request: PlanRequest) -> dict:
    """The base DiT's weight format and its GPU bytes in GiB: in all, per block, outside the blocks, of the LoRAs."""
    fp8, gguf, dit_file = dit_format(request)
    weights = base_dit_weights(request)
    plain = dit_weights(dit_config(request), fp8, gguf, dit_file, ()).part
    kind = "FP8" if weights.fp8 else "bf16"
    if dit_file is not None:
        kind = f"{'GGUF' if is_gguf(Path(dit_file)) else kind} file {Path(dit_file).name}"
    elif gguf is not None:
        kind = f"GGUF {gguf}, estimated"
    part = weights.part
    return {
        "format": kind,
        "total_gib": round(part.total / GIB, 3),
        "rest_gib": round(part.rest / GIB, 3),
        "blocks": len(part.blocks),
        "largest_block_gib": round(max(part.blocks, default=0) / GIB, 4),
        "lora_gib": round((part.total - plain.total) / GIB, 4),
        "bytes": part.total,
    }


def lora_layout(source: str | Path | dict[str, torch.Tensor], request: PlanRequest) -> LoraLayout:
    """A LoRA file (or state dict) as it would attach to the request's DiT (checked as `load_lora_weights` checks).
    A safetensors file is read from its header: its matrices as meta tensors, only the scalar alphas read."""
    if isinstance(source, dict):
        state = source
    elif Path(source).suffix == ".safetensors" and Path(source).is_file():
        with SafetensorsReader(source) as reader:
            state = {k: reader.get(k) if k.endswith(ALPHA_SUFFIX) else reader.get_meta(k) for k in reader.keys()}
    else:
        state = read_lora_file(source)
    label = "lora" if isinstance(source, dict) else Path(source).stem
    described = "the LoRA state dict" if isinstance(source, dict) else str(source)
    updates, _, _ = parse_lora(state, dit_on_meta(dit_config(request)), source=described)
    if not updates:
        raise ValueError(f"{label} holds no LoRA matrix for the DiT's layers")
    dense = [(u.module, sum(d.numel() for d in (u.diff, u.diff_b) if d is not None)) for u in updates]
    return LoraLayout(label, tuple(sorted((u.module, int(u.down.shape[0])) for u in updates)),
                      tuple(sorted((module, elements) for module, elements in dense if elements)))
