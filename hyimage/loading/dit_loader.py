"""Load a diffusion transformer from one safetensors file: fused, split or diffusers layout, bf16 or FP8.

The model and the official state dict use the split layout (`img_attn_q/k/v`, `linear1_q/k/v/mlp`,
`linear2.fc`); the released base file uses HunyuanVideo's fused layout (`img_attn_qkv`, `txt_attn_qkv`,
`linear1`, `linear2`), the distilled and FP8 files the split one (dit_fused_keys gives the evidence per file).
Each file's layout is detected from its keys, as is diffusers' `HunyuanImageTransformer2DModel` layout. FP8 pairs
(`*_fp8.safetensors` + `*_fp8_scale.safetensors`) load with the scales stored in the weights file or in the scale
file, keyed by split or fused module names (a fused module's one per-tensor scale serves each of its parts).
"""

from collections import Counter
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import torch
from loguru import logger

from hyimage.loading.dit_diffusers_keys import diffusers_to_official, is_diffusers_layout
from hyimage.loading.dit_fused_keys import FUSED, dit_layout, fused_to_split, split_keys, split_module_names
from hyimage.loading.safetensors_io import (
    CheckpointError,
    GetTensor,
    PathLike,
    TensorInfo,
    TensorSource,
    Translate,
    is_float8,
    load_safetensors_into,
    read_tensor_infos,
)
from hyimage.models.dit.configs import DiTConfig
from hyimage.models.dit.model import HYImageDiffusionTransformer
from hyimage.quantization.fp8 import SCALE_SUFFIX, convert_to_fp8_linear, fp8_linear_modules, quantizing


def load_dit(
    path: PathLike,
    config: str | dict | DiTConfig,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    fp8_scale: PathLike | None = None,
    quantize_fp8: bool = False,
) -> HYImageDiffusionTransformer:
    """Build the DiT `config` on meta and stream the weights of `path` into it.

    `path` may use the released fused layout, the split layout of the model, or diffusers' layout. FP8: an
    official `*_fp8.safetensors` with its `*_fp8_scale.safetensors` as `fp8_scale`, or `quantize_fp8=True` to
    quantize a bf16 file per tensor while loading. `dtype` (default: the file's floating dtype) applies to all
    non-FP8 tensors; FP8 weights stay float8_e4m3fn and their scales float32.
    """
    path = Path(path)
    infos = read_tensor_infos(path)
    layout = "diffusers" if is_diffusers_layout(list(infos)) else dit_layout(path, _modules(infos))
    stored_fp8 = any(is_float8(info.dtype) for info in infos.values())
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

    model = HYImageDiffusionTransformer.from_config(config, device="meta")
    sources = [TensorSource(path, _translation(layout, model.config.hidden_size))]
    keep_dtype: set[str] = set()
    transform = None
    if stored_fp8 or quantize_fp8:
        names = fp8_linear_modules(model)
        convert_to_fp8_linear(model, names)
        keep_dtype = {name + SCALE_SUFFIX for name in names}
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
        load_safetensors_into(model, sources, dtype=dtype, device=device, keep_dtype=keep_dtype, transform=transform)
    except CheckpointError as error:
        if layout != FUSED:
            raise
        raise CheckpointError(
            f"{error}\n(The file is in the released fused layout; the keys above are the model's split names: "
            "img_attn_q/k/v come from img_attn_qkv, linear1_q/k/v/mlp from linear1, linear2.fc from linear2.)"
        ) from None
    return model.eval()


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
