"""A block's q|k|v (single blocks: q|k|v|mlp) input projections run as one matmul, as the released fused layout
stores them: one read of the activations and one GEMM instead of three or four.

The blocks keep one layer per split part (`img_attn_q/k/v`, `txt_attn_q/k/v`, `linear1_q/k/v/mlp`), so the state
dict, the loaders, LoRA's per-layer hooks and FP8/GGUF conversion see the official split layout unchanged. What
changes is where a group's weights live: `pack` points the parts' weights (and biases) at consecutive rows of one
tensor (made once; the parts are views of it, so it costs no memory), and `project` multiplies the activations by
the rows of all parts, read as one view, and splits the output. The result equals the parts' matmuls up to the
GEMM's summation order (on the CPU the tiny tree's images are bit-identical).

Measured: one CPU step of a mid-size DiT (`benchmarks/bench_step_cpu.py`, 2 threads), fused / split 0.98x (fp32)
and 1.03x (bf16) at width 512, 1.03x and 0.98x at 1024: no gain on the CPU, where three GEMMs of these sizes run
as fast as one. The reason to fuse is the GPU (one read of the activations, one larger kernel instead of three or
four); `benchmarks/bench_step_gpu.py` measures it (rows `split`) and has not yet run on a GPU.

Why views, not a fused copy or a `torch.cat` per step: a copy would hold these layers' weights twice (7 of a single
block's 15 dim^2, 6 of a double block's 36: about 30% of the 17B model, 10 GB in bf16), and a cat per step reads and
writes the group's weights once more per step. Views are exact and free, but only while nothing replaces a part's
tensor, and some things do (`.to()` copies each parameter on its own, `load_state_dict(assign=True)`). So `project`
checks at every call (storage identity and offsets: microseconds) that the weights still are consecutive rows of one
storage, and otherwise runs the parts one by one: never a wrong or stale weight. Blocks pack again after
`.to()`/`.float()`/... (`PackedProjections._apply`; transient memory: one group), `from_single_file` packs after
loading (one copy of the groups' weights, about 30% of a bf16 DiT; transient: one group), LoRA fuses in place, and
the offload module copies consecutive tensors of one storage as one span, so the device copies stay packed.

Paths, per group and call (`path_of`):
- PLAIN: every part a plain nn.Linear without hooks, no gradient wanted, weights packed: one `F.linear`;
- FP8_DEQUANT: every part an FP8Linear computing "dequant" (the default), no hooks: each part is dequantised into
  its rows of one buffer (FP8Linear's conversion and scaling, element by element, in the matmul's dtype), then one
  `F.linear`;
- PARTS, each part on its own: a LoRA side branch (a forward hook), GGUFLinear, FP8 "scaled_mm", tracing under
  `torch.compile` (no storage check there), or weights not packed.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hyimage.quantization.fp8 import FP8Linear

PLAIN, FP8_DEQUANT, PARTS = "plain", "fp8_dequant", "parts"


def row_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over `tensors` stacked along dim 0 when they are consecutive contiguous rows of one storage
    (same dtype, device and trailing shape), else None. No copy."""
    first = tensors[0]
    if first.is_meta:
        return None
    storage, offset = first.untyped_storage(), first.storage_offset()  # one Python object per storage
    for tensor in tensors:
        if (
            not tensor.is_contiguous()
            or tensor.dtype != first.dtype
            or tensor.device != first.device
            or tensor.shape[1:] != first.shape[1:]
            or tensor.untyped_storage() is not storage
            or tensor.storage_offset() != offset
        ):
            return None
        offset += tensor.numel()
    rows = sum(tensor.shape[0] for tensor in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def _biases(parts: Sequence[nn.Module]) -> list[torch.Tensor] | None:
    """The parts' biases, [] when none has one, None when only some have."""
    biases = [part.bias for part in parts if part.bias is not None]
    return biases if len(biases) in (0, len(parts)) else None


def path_of(parts: Sequence[nn.Module]) -> str:
    """Which path `project` takes for `parts` now: PLAIN, FP8_DEQUANT or PARTS."""
    if torch.compiler.is_compiling() or _global_hooks() or any(_hooked(part) for part in parts):
        return PARTS
    biases = _biases(parts)
    if biases is None:
        return PARTS
    if all(type(part) is nn.Linear for part in parts):
        wants_grad = torch.is_grad_enabled() and any(p.requires_grad for part in parts for p in part.parameters())
        if wants_grad or row_view([part.weight for part in parts]) is None or (biases and row_view(biases) is None):
            return PARTS
        return PLAIN
    if all(type(part) is FP8Linear and (part.compute or "dequant") == "dequant" for part in parts):
        return FP8_DEQUANT
    return PARTS


def _fp8_dequantized(parts: Sequence[FP8Linear], x: torch.Tensor) -> torch.Tensor:
    """The parts' weights as FP8Linear dequantises them for `x` (`weight.to(x.dtype) * weight_scale.to(x.dtype)`),
    stacked in the dtype the matmul runs in: autocast's where it is on (the cast F.linear would make), so a float32
    input under autocast needs one part's float32 copy at a time, not the whole group's."""
    dtype = x.dtype
    autocast = torch.is_autocast_enabled(x.device.type)
    matmul_dtype = torch.get_autocast_dtype(x.device.type) if autocast else dtype
    weight = torch.empty(
        sum(part.out_features for part in parts), parts[0].in_features, dtype=matmul_dtype, device=x.device
    )
    start = 0
    for part in parts:
        rows = weight[start : start + part.out_features]
        if matmul_dtype == dtype:
            rows.copy_(part.weight).mul_(part.weight_scale.to(dtype))
        else:
            rows.copy_(part.weight.to(dtype).mul_(part.weight_scale.to(dtype)))
        start += part.out_features
    return weight


def project(x: torch.Tensor, parts: Sequence[nn.Module]) -> list[torch.Tensor]:
    """[part(x) for part in parts], computed as one matmul when `path_of(parts)` allows it."""
    path = path_of(parts)
    if path == PARTS:
        return [part(x) for part in parts]
    biases = _biases(parts)
    if path == PLAIN:
        weight = row_view([part.weight.detach() for part in parts])
        bias = row_view([b.detach() for b in biases]) if biases else None
    else:
        weight = _fp8_dequantized(parts, x)
        bias = torch.cat([b.to(x.dtype) for b in biases]) if biases else None
    return list(F.linear(x, weight, bias).split([part.out_features for part in parts], dim=-1))


def pack(parts: Sequence[nn.Module]) -> bool:
    """Point the weights (and biases) of `parts`, plain nn.Linear layers, at consecutive rows of one new tensor
    each; a no-op when they already are. False when they cannot be packed (not all plain nn.Linear, on meta, or of
    different dtypes or devices)."""
    if not all(type(part) is nn.Linear for part in parts):
        return False
    for tensors in ([part.weight for part in parts], _biases(parts)):
        if tensors is None:
            return False
        if not tensors or row_view(tensors) is not None:
            continue
        if any(t.is_meta for t in tensors) or len({(t.dtype, t.device) for t in tensors}) > 1:
            return False
        with torch.no_grad():
            packed = torch.cat([t.detach() for t in tensors])
        start = 0
        for tensor in tensors:
            tensor.data = packed[start : start + tensor.shape[0]]
            start += tensor.shape[0]
    return True


class PackedProjections(nn.Module):
    """A block whose input projections run fused: `projection_groups` names the parts of each group, in order."""

    projection_groups: tuple[tuple[str, ...], ...] = ()

    def group(self, index: int) -> list[nn.Module]:
        """The layers of group `index`, looked up now (FP8 or GGUF conversion replaces them)."""
        return [getattr(self, name) for name in self.projection_groups[index]]

    def pack_projections(self) -> None:
        """Pack every group whose parts are plain nn.Linear layers (see `pack`)."""
        for index in range(len(self.projection_groups)):
            pack(self.group(index))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "PackedProjections":
        """`.to()`, `.float()`, ... copy each parameter on its own: pack again afterwards."""
        module = super()._apply(fn, recurse)
        self.pack_projections()
        return module


def pack_projections(model: nn.Module) -> nn.Module:
    """Pack the projection groups of every block of `model` (after loading); returns `model`."""
    for module in model.modules():
        if isinstance(module, PackedProjections):
            module.pack_projections()
    return model
