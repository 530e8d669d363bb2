"""What the DiT weighs on the GPU in each format it loads in (bf16, FP8, a GGUF file or type, a safetensors
file), with the adapters of its LoRAs, counted on the DiT built on `meta` as the loaders build it.

bf16 / FP8: the DiT built on meta (FP8 linears converted as the loader converts them), counted per block.
A DiT file: the DiT its loader builds from the file's header, on meta (`gguf_dit_on_meta`, `safetensors_dit_on_meta`):
a GGUF file's quantised linears keep their ggml bytes (uint8), a safetensors file's float8 linears are FP8, everything
else is loaded as bf16 (whatever the file stores), so the count equals the loaded model's, block by block.
A GGUF type without a file: the DiT quantised as ComfyUI-GGUF's tools make such a file (see GGUF_KEPT); its
linears' rows take `columns / block * block bytes` (the ggml block sizes, also the gguf package's
GGML_QUANT_SIZES: Q8_0 34 bytes per 32 values, Q4_K 144 per 256, ...).
A LoRA adds, on each layer it adapts, A (rank x in) and B (out x rank) in the layer's compute dtype (bf16 on CUDA)
and its 0-dim float32 scale, in the block that holds the layer (they stream with it).
"""

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hyimage.loading.dit_loader import is_gguf, safetensors_dit_on_meta
from hyimage.loading.gguf_loader import gguf_dit_on_meta
from hyimage.lora.keys import adaptable_layers, layer_features, linear_layers
from hyimage.lora.layers import adapter_names, banks
from hyimage.models.dit.configs import DiTConfig
from hyimage.models.dit.model import HYImageDiffusionTransformer
from hyimage.offload.pinned import PAGE, aligned
from hyimage.offload.streaming import find_block_lists
from hyimage.offload.weights import Part, module_part
from hyimage.quantization.fp8 import (
    FP8Linear,
    convert_to_fp8_linear,
    fp8_linear_modules,
)
from hyimage.quantization.gguf import GGML_TYPES, GGUFLinear, type_name

# The DiT's weights.
#
# bf16 / FP8: the DiT built on meta (FP8 linears converted as the loader converts them), counted per block.
# A DiT file: the DiT its loader builds from the file's header, on meta (`gguf_dit_on_meta`, `safetensors_dit_on_meta`):
# a GGUF file's quantised linears keep their ggml bytes (uint8), a safetensors file's float8 linears are FP8, everything
# else is loaded as bf16 (whatever the file stores), so the count equals the loaded model's, block by block.
# A GGUF type without a file: the DiT quantised as ComfyUI-GGUF's tools make such a file (see GGUF_KEPT); its
# linears' rows take `columns / block * block bytes` (the ggml block sizes, also the gguf package's
# GGML_QUANT_SIZES: Q8_0 34 bytes per 32 values, Q4_K 144 per 256, ...).
# A LoRA adds, on each layer it adapts, A (rank x in) and B (out x rank) in the layer's compute dtype (bf16 on CUDA)
# and its 0-dim float32 scale, in the block that holds the layer (they stream with it).
GGUF_KEPT = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
"""Weights ComfyUI-GGUF's llama.cpp patch (`tools/lcpp.patch`, `llama_tensor_get_type`) keeps in F32/F16 at every
quantisation type. Its `tools/convert.py` also keeps 1-D tensors and those of at most GGUF_SMALL values in F32, and
a row that is no whole number of the type's blocks falls back to F16; hyimage loads all of these as bf16."""


GGUF_SMALL = 1024


GGUF_DEQUANT_BYTES = {
    "Q8_0": 9.25, "Q6_K": 15.0, "Q5_K": 15.5, "Q5_1": 11.0, "Q5_0": 11.0, "Q4_K": 13.0, "Q4_1": 8.8, "Q4_0": 8.75,
    "Q3_K": 11.25, "Q2_K": 13.0,
}
"""Peak bytes per weight that `GGUFLinear` allocates while it dequantises its weight for one forward (int16 and
float32 intermediates of `hyimage.quantization.gguf`, the float32 result and its bf16 copy). Measured with
benchmarks/memsim.py's LiveBytes on a 1536 x 3584 layer: Q8_0 9.19, Q6_K 14.82, Q5_K 15.31, Q5_1 10.88,
Q5_0 10.81, Q4_K 12.94, Q4_1 8.75, Q4_0 8.69, Q3_K 11.18, Q2_K 12.98 (tests/test_plan_formats.py checks the bound).
The largest quantised layer's figure is added to the DiT's activations."""


GGUF_TYPES = tuple(GGUF_DEQUANT_BYTES)
"""The GGUF types a plan can estimate (those hyimage dequantises)."""


LORA_ITEMSIZE = 2
"""Adapters run in the layer's compute dtype: bf16 on CUDA (and for FP8 and GGUF layers, see `hyimage.lora.layers`)."""


@dataclass(frozen=True)
class LoraLayout:
    """One LoRA as the plan sees it: the DiT layers it adapts, each with its rank, and the numbers of the dense
    differences (ComfyUI's `.diff` and `.diff_b`) it holds per layer."""

    name: str
    ranks: tuple[tuple[str, int], ...]
    dense: tuple[tuple[str, int], ...] = ()


@dataclass
class DiTWeights:
    """The DiT's weights on the GPU (`part`) and what its formats add to one forward's activations."""

    part: Part
    fp8: bool
    dequant_bytes: int = 0
    """The largest GGUF layer's dequantisation temporaries (GGUF_DEQUANT_BYTES x its weights)."""
    lora_rank: int = 0
    """The largest rank of the adapted layers, summed over the LoRAs (0: no LoRA)."""


@dataclass
class _DiTLayout:
    part: Part
    fp8: bool
    dequant_bytes: int
    blocks: dict[str, int]
    features: dict[str, tuple[int, int]]


def dit_on_meta(config: Any, fp8: bool = False, gguf: str | None = None, dit_file: str | None = None) -> nn.Module:
    """The DiT of a DiTConfig on meta as it is loaded for a CUDA run: bf16, FP8 linears when `fp8`, GGUF linears of a
    type (`gguf`, see GGUF_KEPT), or as a DiT file loads (a GGUF file's quantised linears, a safetensors file's FP8
    ones), read from the file's header."""

    if dit_file is not None:

        read = gguf_dit_on_meta if is_gguf(Path(dit_file)) else safetensors_dit_on_meta
        return read(HYImageDiffusionTransformer, dit_file, config)
    with torch.device("meta"):
        model = HYImageDiffusionTransformer(**config.to_dict(), dtype=torch.bfloat16)
    if fp8:

        convert_to_fp8_linear(model, fp8_linear_modules(model))
    if gguf is not None:
        _quantize_like_gguf(model, gguf)
    return model.eval()


def _quantize_like_gguf(model: nn.Module, type_name: str) -> None:
    """Replace the linears a GGUF file of `type_name` quantises by (meta) GGUFLinear layers."""

    type_id = next(i for i, (name, _, _) in GGML_TYPES.items() if name == type_name)
    block = GGML_TYPES[type_id][1]
    for name, layer in list(model.named_modules()):
        if type(layer) is not nn.Linear or name.startswith(GGUF_KEPT):
            continue
        if layer.weight.numel() <= GGUF_SMALL or layer.in_features % block:
            continue
        has_bias = layer.bias is not None
        quantized = GGUFLinear(layer.in_features, layer.out_features, type_id, bias=has_bias,
                               device=torch.device("meta"), bias_dtype=layer.bias.dtype if has_bias else None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)


@functools.lru_cache(maxsize=16)
def _dit_layout(config: DiTConfig, fp8: bool, gguf: str | None, dit_file: str | None, file_stamp: Any) -> _DiTLayout:

    model = dit_on_meta(config, fp8, gguf, dit_file)
    layers = linear_layers(model)
    dequant = max(
        (int(GGUF_DEQUANT_BYTES[type_name(layer.type_id)] * layer.in_features * layer.out_features)
         for layer in layers.values() if isinstance(layer, GGUFLinear)),
        default=0,
    )
    blocks = {f"{name}.{i}.": n for n, (name, i) in enumerate(
        (name, i) for name, block_list in find_block_lists(model) for i in range(len(block_list)))}
    features = {name: layer_features(layer) for name, layer in adaptable_layers(model).items()}
    fp8 = any(isinstance(layer, FP8Linear) for layer in layers.values())
    return _DiTLayout(module_part(model), fp8, dequant, blocks, features)


def dit_part(config: Any, fp8: bool = False, gguf: str | None = None, dit_file: str | None = None,
             loras: tuple[LoraLayout, ...] = ()) -> Part:
    """The DiT's weights on the GPU for a DiTConfig (see `dit_on_meta`), with the adapters of `loras`."""
    return dit_weights(config, fp8, gguf, dit_file, loras).part


def dit_weights(config: Any, fp8: bool, gguf: str | None, dit_file: str | None,
                 loras: tuple[LoraLayout, ...]) -> DiTWeights:
    stamp = None
    if dit_file is not None:
        stat = Path(dit_file).stat()
        stamp = (str(Path(dit_file).resolve()), stat.st_size, stat.st_mtime_ns)
    layout = _dit_layout(config, fp8, gguf, dit_file, stamp)
    rest, blocks = layout.part.rest, list(layout.part.blocks)
    pinned = None if layout.part.pinned is None else list(layout.part.pinned)
    rank = sum(max((r for _, r in lora.ranks), default=0) for lora in loras)
    for lora in loras:
        adds = []  # (module, tensor bytes each): down, up and scale; then each dense difference
        for module, module_rank in lora.ranks:
            if module not in layout.features:
                raise ValueError(f"LoRA {lora.name!r} adapts {module}, which this DiT does not have")
            in_f, out_f = layout.features[module]
            adds.append((module, (module_rank * in_f * LORA_ITEMSIZE, module_rank * out_f * LORA_ITEMSIZE, 4)))
        adds += [(module, (elements * LORA_ITEMSIZE,)) for module, elements in lora.dense]
        for module, sizes in adds:
            index = next((layout.blocks[p] for p in _prefixes(module) if p in layout.blocks), None)
            if index is None:
                rest += sum(sizes)
            else:
                blocks[index] += sum(sizes)
                if pinned is not None:  # packed in the block's buffer (within a page)
                    packed = pinned[index] + sum(aligned(size) for size in sizes)
                    pinned[index] = -(-packed // PAGE) * PAGE
    return DiTWeights(Part(rest, blocks, pinned), layout.fp8, layout.dequant_bytes, rank)


def _prefixes(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) + "." for k in range(1, len(parts))]


def lora_layouts(dit: nn.Module) -> tuple[LoraLayout, ...]:
    """The LoRAs attached to a loaded DiT (`load_lora_weights`), as the plan counts them."""

    found = banks(dit)

    def dense(bank: Any, name: str) -> int:
        return sum(part.numel() for kind in ("diff", "diff_b") if (part := bank.part(name, kind)) is not None)

    return tuple(
        LoraLayout(
            name,
            tuple(sorted((layer, int(bank._buffers[f"{name}_down"].shape[0]))
                         for layer, bank in found.items() if name in bank.names)),
            tuple(sorted((layer, dense(bank, name)) for layer, bank in found.items()
                         if name in bank.names and dense(bank, name))),
        )
        for name in adapter_names(dit)
    )
