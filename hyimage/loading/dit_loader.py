"""Load a diffusion transformer from one safetensors file: fused, split or diffusers layout, bf16 or FP8.

The model and the official state dict use the split layout (`img_attn_q/k/v`, `linear1_q/k/v/mlp`,
`linear2.fc`); the released base file uses HunyuanVideo's fused layout (`img_attn_qkv`, `txt_attn_qkv`,
`linear1`, `linear2`), the distilled and FP8 files the split one (dit_fused_keys gives the evidence per file).
Each file's layout is detected from its keys, as is diffusers' `HunyuanImageTransformer2DModel` layout. FP8 pairs
(`*_fp8.safetensors` + `*_fp8_scale.safetensors`) load with the scales stored in the weights file or in the scale
file, keyed by split or fused module names (a fused module's one per-tensor scale serves each of its parts).
ComfyUI's single files (a `diffusion_model.` prefix, ComfyUI's names, FP8 with `scale_weight` or a plain cast; see
`dit_layouts`) are told from their keys, and a GGUF file from its magic (`gguf_loader`).
"""

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import nn

from hyimage.errors import CheckpointError
from hyimage.loading.dit_diffusers_keys import diffusers_to_official, is_diffusers_layout
from hyimage.loading.dit_fused_keys import FUSED, dit_layout, fused_to_split, split_keys, split_module_names
from hyimage.loading.dit_layouts import comfy_translate, find_prefix, is_comfy_internal, model_keys
from hyimage.loading.gguf_loader import load_gguf_dit
from hyimage.loading.safetensors_header import PathLike, TensorInfo, is_float8, read_tensor_infos
from hyimage.loading.safetensors_io import GetTensor, SafetensorsReader, TensorSource, Translate, load_safetensors_into
from hyimage.quantization.fp8 import SCALE_SUFFIX, convert_to_fp8_linear, fp8_linear_modules, quantizing


def load_dit(
    model_cls: type,
    path: PathLike,
    config: Any,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    fp8_scale: PathLike | None = None,
    quantize_fp8: bool = False,
    verify: bool = False,
    progress_bar: bool = True,
) -> nn.Module:
    """Build `model_cls` (the DiT class) of `config` on meta and stream the weights of `path` into it.

    `path` may use the released fused layout, the split layout of the model, diffusers' or ComfyUI's layout, or
    be a GGUF file. FP8: an official `*_fp8.safetensors` with its `*_fp8_scale.safetensors` as `fp8_scale`, a
    ComfyUI `*_fp8_e4m3fn[_scaled].safetensors`, or `quantize_fp8=True` to quantize a bf16 file per tensor while
    loading. `dtype` (default: the file's floating dtype) applies to all
    non-FP8 tensors; FP8 weights stay float8_e4m3fn and their scales float32. `verify`: refuse NaN/Inf weights,
    naming the tensor. `progress_bar`: a byte bar on stderr while reading (only when stderr is a terminal).
    """
    path = Path(path)
    if is_gguf(path):
        return load_gguf_dit(model_cls, path, config, dtype=dtype, device=device, verify=verify)
    infos = read_tensor_infos(path)
    comfy_file, layout, stored_fp8 = _file_kind(path, infos)
    if fp8_scale is not None and not Path(fp8_scale).is_file():
        raise FileNotFoundError(
            f"FP8 scale file {fp8_scale} does not exist; download the *_fp8_scale.safetensors released with {path.name}"
        )
    if fp8_scale is not None and not stored_fp8:
        raise CheckpointError(
            f"{path} holds no float8 weights, but fp8_scale={fp8_scale} was given: pass the matching "
            "*_fp8.safetensors file, or drop fp8_scale and set quantize_fp8=True to quantize this file while loading"
        )
    if dtype is None:
        dtype = _stored_float_dtype(path, infos)

    if comfy_file and stored_fp8 and fp8_scale is not None:
        raise CheckpointError(f"{path} is a ComfyUI FP8 file, which carries its own scales: drop fp8_scale={fp8_scale}")
    model, translate, names = _on_meta(model_cls, path, config, infos, comfy_file, layout, stored_fp8, quantize_fp8)
    sources = [TensorSource(path, translate)]
    keep_dtype = {name + SCALE_SUFFIX for name in names}
    transform = None
    if comfy_file and stored_fp8:
        transform = partial(_fp8_fixups, module_names=names, dtype=dtype)
    elif stored_fp8 or quantize_fp8:
        if stored_fp8:
            provided = split_keys(infos) if layout == FUSED else set(infos)
            sources += _scale_sources(path, provided, keep_dtype, fp8_scale)
        if quantize_fp8:
            transform = partial(quantizing, module_names=names)
    logger.info(
        "loading DiT {} ({} layout{}) as {} on {}",
        path,
        layout,
        ", FP8" if stored_fp8 or quantize_fp8 else "",
        dtype,
        device,
    )
    try:
        load_safetensors_into(
            model,
            sources,
            dtype=dtype,
            device=device,
            keep_dtype=keep_dtype,
            transform=transform,
            verify=verify,
            progress=f"reading {path.name}" if progress_bar else None,
        )
    except CheckpointError as error:
        if not layout.endswith(FUSED):
            raise
        raise CheckpointError(
            f"{error}\n(The file is in the released fused layout; the keys above are the model's split names: "
            "img_attn_q/k/v come from img_attn_qkv, linear1_q/k/v/mlp from linear1, linear2.fc from linear2.)"
        ) from None
    return model.eval()


def _file_kind(path: Path, infos: dict[str, TensorInfo]) -> tuple[bool, str, bool]:
    """(a ComfyUI file, its layout's name, float8 weights stored) from a safetensors DiT file's header."""
    prefix, comfy = find_prefix(infos), is_comfy_internal(infos)
    comfy_file = bool(prefix or comfy or any(key.endswith((".scale_weight", ".comfy_quant")) for key in infos))
    if comfy_file:
        _check_comfy_quant(path, infos)
        names = [model_keys(key, prefix, comfy) for key in infos]
        layout = "ComfyUI " + dit_layout(path, _modules(name for name in names if name))
    else:
        layout = "diffusers" if is_diffusers_layout(list(infos)) else dit_layout(path, _modules(infos))
    return comfy_file, layout, any(is_float8(info.dtype) for info in infos.values())


def _on_meta(
    model_cls: type,
    path: Path,
    config: Any,
    infos: dict[str, TensorInfo],
    comfy_file: bool,
    layout: str,
    stored_fp8: bool,
    quantize_fp8: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Translate, list[str]]:
    """The DiT on meta with FP8 linears where the file's weights will be FP8 (a ComfyUI file: its float8 layers;
    else the official FP8 layers when the file stores float8 or is quantized while loading), the translation of
    the file's keys, and those FP8 layers' names."""
    model = model_cls.from_config(config, dtype=dtype, device="meta")
    hidden = model.config.hidden_size
    if comfy_file:
        prefix, comfy = find_prefix(infos), is_comfy_internal(infos)
        translate = comfy_translate(prefix, comfy, layout.endswith(FUSED), hidden)
    else:
        translate = _translation(layout, hidden)
    names: list[str] = []
    if comfy_file and stored_fp8:
        names = _fp8_modules_in_file(model, path, translate)
    elif stored_fp8 or quantize_fp8:
        names = fp8_linear_modules(model)
    convert_to_fp8_linear(model, names)
    return model, translate, names


def safetensors_dit_on_meta(
    model_cls: type,
    path: PathLike, config: Any, dtype: torch.dtype = torch.bfloat16
) -> nn.Module:
    """The DiT `load_dit(model_cls, path, config, dtype=dtype)` builds, on meta: FP8 linear layers where the file stores float8
    weights (the memory planner counts a DiT file's GPU bytes from it; reads the header only)."""
    path = Path(path)
    infos = read_tensor_infos(path)
    comfy_file, layout, stored_fp8 = _file_kind(path, infos)
    model, _, _ = _on_meta(model_cls, path, config, infos, comfy_file, layout, stored_fp8, dtype=dtype)
    return model.eval()


def is_gguf(path: Path) -> bool:
    """True when the file starts with the GGUF magic."""
    with open(path, "rb") as file:
        return file.read(4) == b"GGUF"


def _check_comfy_quant(path: Path, infos: dict[str, TensorInfo]) -> None:
    """Newer ComfyUI files describe each quantised layer in `<layer>.comfy_quant` (JSON bytes): only per-tensor
    float8_e4m3fn is read here."""
    keys = [key for key in infos if key.endswith(".comfy_quant")]
    if not keys:
        return
    with SafetensorsReader(path) as reader:
        formats = {json.loads(reader.get(key).numpy().tobytes()).get("format") for key in keys}
    unsupported = formats - {"float8_e4m3fn"}
    if unsupported:
        raise CheckpointError(
            f"{path} is quantised as {', '.join(sorted(map(str, unsupported)))} (ComfyUI comfy_quant), which hyimage "
            "does not read; use the bf16, FP8 (float8_e4m3fn) or GGUF file of this model"
        )


def _fp8_modules_in_file(model: nn.Module, path: Path, translate: Translate) -> list[str]:
    """The model's linear layers whose weight the ComfyUI file stores as float8 (read from the header only)."""
    reader = SafetensorsReader(path)
    names = []
    for key, tensor in translate(reader.keys(), reader.get_meta):
        module, _, param = key.rpartition(".")
        if param == "weight" and is_float8(tensor.dtype):
            try:
                layer = model.get_submodule(module)
            except AttributeError:
                continue
            if isinstance(layer, torch.nn.Linear):
                names.append(module)
    return names


def _fp8_fixups(
    stream: Iterator[tuple[str, torch.Tensor]], module_names: Iterable[str], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """ComfyUI FP8 files: float8 tensors outside linear layers become `dtype`; a float8 linear layer whose file
    has no scale (a plain `fp8_e4m3fn` cast) gets `weight_scale` 1."""
    fp8 = set(module_names)
    unscaled = set(fp8)
    device = None
    for key, tensor in stream:
        device = tensor.device
        module = key.rpartition(".")[0]
        if key.endswith(SCALE_SUFFIX):
            unscaled.discard(module)
        elif is_float8(tensor.dtype) and module not in fp8:
            tensor = tensor.to(dtype)
        yield key, tensor
    for module in sorted(unscaled):
        yield module + SCALE_SUFFIX, torch.ones((), dtype=torch.float32, device=device)


def _modules(keys: Iterable[str]) -> list[str]:
    return [key.rpartition(".")[0] for key in keys]


def _translation(layout: str, hidden_size: int) -> Translate | None:
    if layout == "diffusers":
        return diffusers_to_official
    if layout == FUSED:
        return partial(fused_to_split, hidden_size=hidden_size)
    return None


def _stored_float_dtype(path: Path, infos: dict[str, TensorInfo]) -> torch.dtype:
    """The floating dtype holding most of the non-FP8 elements of the file."""
    counts: Counter = Counter()
    for key, info in infos.items():
        if info.dtype.is_floating_point and not is_float8(info.dtype) and not key.endswith(SCALE_SUFFIX):
            counts[info.dtype] += torch.Size(info.shape).numel()
    if not counts:
        raise CheckpointError(f"{path} holds no floating-point tensors; it is not a DiT checkpoint")
    return counts.most_common(1)[0][0]


def _scale_sources(
    path: Path, provided: set[str], scale_keys: set[str], fp8_scale: PathLike | None
) -> list[TensorSource]:
    """The FP8 scale file as a source of `<name>.weight_scale`, when the checkpoint lacks some scales."""
    if scale_keys <= provided:
        return []
    if fp8_scale is None:
        raise CheckpointError(
            f"{path} holds float8 weights without all their scales: pass the matching "
            "*_fp8_scale.safetensors file as fp8_scale=..."
        )
    dit_layout(Path(fp8_scale), read_tensor_infos(fp8_scale))
    return [TensorSource(Path(fp8_scale), partial(_scales_as_model_keys, Path(fp8_scale)))]


def _scales_as_model_keys(path: Path, keys: Iterable[str], get_tensor: GetTensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The released scale file maps a module name (split, or fused: then the scale serves each part) to a
    one-element scale: yield `<model module>.weight_scale`, 0-dim."""
    for key in keys:
        for name in split_module_names(key):
            scale = get_tensor(key)
            if scale.numel() != 1:
                raise CheckpointError(
                    f"{path}: FP8 scale {key!r} has shape {tuple(scale.shape)}, but a per-tensor scale has one "
                    "element; pass the *_fp8_scale.safetensors file released with the FP8 checkpoint"
                )
            yield name + SCALE_SUFFIX, scale.reshape(())
