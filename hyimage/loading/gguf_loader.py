"""Load a GGUF-quantised DiT (QuantStack's HunyuanImage-2.1 GGUF files, city96's ComfyUI-GGUF convert tool).

Facts: city96's `tools/convert.py` keeps the source checkpoint's keys (a ComfyUI `model.diffusion_model.`
prefix is stripped; HunyuanImage-2.1 files pass its "hyvid" key detection, `img_attn_proj` and the token
refiner's `self_attn_qkv`, so they keep the source's fused or split layout), writes 1-D and small tensors as F32
and the rest as F16/BF16, which llama.cpp's patched `llama-quantize` turns into Q8_0 ... Q2_K; ComfyUI-GGUF's
loader reverses the ggml shape order and honours `comfy.gguf.orig_shape.<name>` metadata. Not verified on the
real files (not downloadable here): which layout QuantStack's files have and which tensors they kept at
higher precision; both layouts and every listed type are read.

`gguf_header` reads the header (names, types, shapes and offsets) within the file's bounds (the `gguf`
package's reader trusts the declared lengths; see there). The bytes of each tensor are then read straight into fresh memory (as in `safetensors_io`), so
host RAM holds one copy of the quantised file. Linear layers with a quantised weight become `GGUFLinear`
(their ggml rows, split by rows for the fused layout, as ggml blocks run along a row); every other
tensor is dequantised once to `dtype` (default bfloat16).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import nn

from hyimage.errors import CheckpointError
from hyimage.loading.dit_fused_keys import dit_layout
from hyimage.loading.dit_layouts import find_prefix, is_comfy_internal, model_keys, row_pieces
from hyimage.loading.gguf_header import original_shape, read_gguf_header
from hyimage.loading.safetensors_header import PathLike
from hyimage.loading.safetensors_io import assert_materialized
from hyimage.loading.verify import check_finite
from hyimage.quantization.gguf import GGML_TYPES, PLAIN_TYPES, GGUFLinear, dequantize, row_bytes, type_name

SHOWN = 5


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: torch shape (outermost first), ggml type and where its bytes are."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int
    nbytes: int

    @property
    def quantized(self) -> bool:
        return type_name(self.type_id) not in PLAIN_TYPES


def read_gguf_tensors(path: PathLike) -> list[GGUFTensor]:
    """The tensors listed in the header of the GGUF file `path` (reads no tensor data; every count and length of
    the header is checked against the file's size first, see `gguf_header`)."""
    header = read_gguf_header(path)
    return [
        GGUFTensor(tensor.name, original_shape(path, header, tensor), tensor.type_id, tensor.offset, tensor.nbytes)
        for tensor in header.tensors
    ]


def _read(file, tensor: GGUFTensor) -> torch.Tensor:
    """The raw bytes of `tensor`, newly read into a uint8 tensor."""
    raw = torch.empty(tensor.nbytes, dtype=torch.uint8)
    file.seek(tensor.offset)
    if file.readinto(memoryview(raw.numpy())) != tensor.nbytes:
        raise CheckpointError(f"{file.name}: tensor {tensor.name!r} ends past the end of the file; download it again")
    return raw


def _set(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def _plan(
    model: nn.Module, path: Path, tensors: list[GGUFTensor]
) -> tuple[dict[str, list[tuple[str, int, int]]], set[str]]:
    """file tensor -> [(model key, first row, end row)], and the linear layers that stay quantised."""
    names = [t.name for t in tensors]
    prefix, comfy = find_prefix(names), is_comfy_internal(names)
    keys = [model_keys(name, prefix, comfy) for name in names]
    dit_layout(path, [key.rpartition(".")[0] for key in keys if key])  # refuses a mix of fused and split blocks
    hidden = model.config.hidden_size
    plan: dict[str, list[tuple[str, int, int]]] = {}
    quantized: set[str] = set()
    for tensor in tensors:
        key = model_keys(tensor.name, prefix, comfy)
        if not key:
            continue
        module, _, param = key.rpartition(".")
        pieces = row_pieces(module, tensor.shape[0] if tensor.shape else 1, hidden)
        plan[tensor.name] = [(f"{piece}.{param}", start, end) for piece, start, end in pieces]
        if tensor.quantized and param == "weight" and len(tensor.shape) == 2:
            for piece, _, _ in pieces:
                if isinstance(_submodule(model, piece), nn.Linear):
                    quantized.add(piece)
    return plan, quantized


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _to_gguf_linear(model: nn.Module, name: str, type_id: int) -> None:
    linear = model.get_submodule(name)
    parent, _, child = name.rpartition(".")
    has_bias = linear.bias is not None
    layer = GGUFLinear(
        linear.in_features,
        linear.out_features,
        type_id,
        bias=has_bias,
        device=torch.device("meta"),
        bias_dtype=linear.bias.dtype if has_bias else None,
    )
    setattr(model.get_submodule(parent), child, layer)


def _check(model: nn.Module, path: Path, tensors: list[GGUFTensor], plan: dict, quantized: set[str]) -> None:
    """Raise CheckpointError listing missing, unexpected and wrongly shaped tensors, before any data is read."""
    expected = model.state_dict(keep_vars=True)
    by_name = {t.name: t for t in tensors}
    produced: dict[str, tuple[int, ...]] = {}
    for name, pieces in plan.items():
        tensor = by_name[name]
        for key, start, end in pieces:
            module = key.rpartition(".")[0]
            if module in quantized and key.endswith(".weight"):
                produced[key] = (end - start, row_bytes(tensor.type_id, tensor.shape[-1]))
            else:
                produced[key] = (end - start, *tensor.shape[1:]) if tensor.shape else ()
    missing = [key for key in expected if key not in produced]
    unexpected = [key for key in produced if key not in expected]
    shapes = [
        f"{key}: file {shape} vs model {tuple(expected[key].shape)}"
        for key, shape in produced.items()
        if key in expected and tuple(expected[key].shape) != shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{path} does not fit {type(model).__name__}:"]
        for items, what in (
            (missing, "missing keys (the model needs them, the file lacks them)"),
            (unexpected, "unexpected keys (in the file, unknown to the model)"),
            (shapes, "keys with the wrong shape"),
        ):
            if items:
                lines.append(
                    f"  {len(items)} {what}: " + ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")
                )
        lines.append("Check that the GGUF file is a quantisation of this model and configuration.")
        raise CheckpointError("\n".join(lines))


def _skeleton(
    model_cls: type,
    path: Path, config: Any, dtype: torch.dtype
) -> tuple[nn.Module, list[GGUFTensor], dict[str, list[tuple[str, int, int]]], set[str]]:
    """The DiT on meta as `path` fills it (quantised linears as GGUFLinear, other tensors `dtype`), checked."""
    tensors = read_gguf_tensors(path)
    unknown = sorted({type_name(t.type_id) for t in tensors if t.type_id not in GGML_TYPES})
    if unknown:
        raise CheckpointError(f"{path} holds tensors of GGUF type {', '.join(unknown)}, which hyimage does not read")
    model = model_cls.from_config(config, dtype=dtype, device="meta")
    plan, quantized = _plan(model, path, tensors)
    by_module = {}
    for tensor in tensors:
        for key, _, _ in plan.get(tensor.name, []):
            if key.endswith(".weight") and key[: -len(".weight")] in quantized:
                by_module[key[: -len(".weight")]] = tensor.type_id
    for name, type_id in by_module.items():
        _to_gguf_linear(model, name, type_id)
    _check(model, path, tensors, plan, quantized)
    return model, tensors, plan, quantized


def gguf_dit_on_meta(
    model_cls: type,
    path: PathLike, config: Any, dtype: torch.dtype = torch.bfloat16
) -> nn.Module:
    """The DiT `load_gguf_dit(model_cls, path, config, dtype=dtype)` builds, on meta: its tensors' shapes and dtypes, no data
    (the memory planner counts the GPU bytes of a GGUF DiT from it; reads the file's header only)."""
    return _skeleton(model_cls, Path(path), config, dtype)[0].eval()


def load_gguf_dit(
    model_cls: type,
    path: PathLike,
    config: Any,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    verify: bool = False,
) -> nn.Module:
    """Build the DiT `config` on meta and fill it from the GGUF file `path`, quantised linears kept quantised.
    `verify`: refuse NaN/Inf values, naming the tensor (each quantised tensor is dequantised once to check it)."""
    path = Path(path)
    dtype = torch.bfloat16 if dtype is None else dtype
    device = torch.device(device)
    model, tensors, plan, quantized = _skeleton(model_cls, path, config, dtype)

    counts: dict[str, int] = {}
    with open(path, "rb", buffering=0) as file:
        for tensor in tensors:
            if tensor.name not in plan:
                continue
            counts[type_name(tensor.type_id)] = counts.get(type_name(tensor.type_id), 0) + 1
            raw = _read(file, tensor)
            pieces = plan[tensor.name]
            keep = all(key.rpartition(".")[0] in quantized for key, _, _ in pieces) and tensor.quantized
            if verify:
                check_finite(tensor.name, dequantize(raw, tensor.type_id, tensor.shape, torch.float32), path)
            if keep:
                rows = raw.reshape(tensor.shape[0], -1)
                for key, start, end in pieces:
                    part = rows if len(pieces) == 1 else rows[start:end].clone()
                    _set(model, key, part.to(device))
            else:
                values = dequantize(raw, tensor.type_id, tensor.shape, dtype)
                for key, start, end in pieces:
                    part = values if len(pieces) == 1 else values[start:end].clone()
                    _set(model, key, part.to(device))
            del raw
    assert_materialized(model, [path])
    logger.info(
        "loaded GGUF DiT {} ({}; {} linear layers kept quantised) as {} on {}",
        path,
        ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())),
        len(quantized),
        dtype,
        device,
    )
    return model.eval()
