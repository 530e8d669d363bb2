"""LoRA adapters on a model's layers, run as a side branch or fused into the weights.

Each targeted layer (nn.Linear, FP8Linear, GGUFLinear, a convolution, a LayerNorm) gets a child `lora` (a
`LoraBank`) holding, per adapter, `down` (A), `up` (B, alpha/rank folded in; rank 0 when the adapter has no
low-rank pair there), optionally `diff` (a full weight difference) and `diff_b` (a bias difference), and `scale`,
all non-persistent buffers: the model's state dict is unchanged, and they move with the layer (`.to()`, model
offload, block streaming). A forward hook adds the adapters to the layer's output: `scale * up(down(x))`, plus
`scale * layer_with_weight(diff)(x)` and `scale * diff_b` (the layer is linear in its weight and bias, a LayerNorm
too: LN(x; w + d, b) = LN(x; w, b) + LN(x; d, 0)). So FP8 and GGUF weights are never dequantised for good, and a
`.diff` on a quantised weight runs as a dense side branch in the compute dtype: exact, at the memory of one
unquantised weight per such layer (GGUF cannot be requantised in torch, and folding it into FP8 would round it to
3 mantissa bits). `scale` is a 0-dim tensor updated in place, so a compiled model (`torch.compile`) does not
recompile when only a scale changes.

Fusing adds `scale * (B @ A + diff)` to the weights and `scale * diff_b` to the biases (in float32, then back to
their dtype; an FP8 weight is requantised per tensor with a new scale) and keeps the original tensors in host
memory, so unfusing restores them bit for bit. Both write into the layer's tensors in place: a weight that is a view
of a larger buffer (a DiT block's packed q|k|v rows, `hyimage.models.dit.fused`) stays one. GGUF weights cannot be
requantised in torch: fusing them is refused.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn

from hyimage.lora.keys import LoraUpdate, adaptable_layers
from hyimage.models.dit.layers import compute_dtype
from hyimage.quantization.fp8 import FP8Linear, quantize_per_tensor
from hyimage.quantization.gguf import GGUFLinear

BANK = "lora"


class LoraBank(nn.Module):
    """The adapters of one layer: `<name>_down`, `<name>_up`, `<name>_scale` and the optional `<name>_diff`,
    `<name>_diff_b` buffers (not saved)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.branch: list[str] = []
        self.backup: dict[str, torch.Tensor] | None = None

    def add(self, name: str, update: LoraUpdate, scale: float, device: torch.device, dtype: torch.dtype) -> None:
        self.register_buffer(f"{name}_down", update.down.to(device, dtype), persistent=False)
        self.register_buffer(f"{name}_up", update.up.to(device, dtype), persistent=False)
        for part in ("diff", "diff_b"):
            if getattr(update, part) is not None:
                self.register_buffer(f"{name}_{part}", getattr(update, part).to(device, dtype), persistent=False)
        self.register_buffer(f"{name}_scale", torch.tensor(float(scale), device=device), persistent=False)
        self.names.append(name)
        self.branch.append(name)

    def remove(self, name: str) -> None:
        for part in ("down", "up", "diff", "diff_b", "scale"):
            self._buffers.pop(f"{name}_{part}", None)
        self.names.remove(name)
        if name in self.branch:
            self.branch.remove(name)

    def part(self, name: str, part: str) -> torch.Tensor | None:
        """One adapter's `down`, `up`, `diff`, `diff_b` or `scale`; None for a part it lacks (or a rank-0 pair)."""
        tensor = self._buffers.get(f"{name}_{part}")
        return None if tensor is None or tensor.numel() == 0 else tensor

    def delta(self, names: Iterable[str], device: torch.device, shape: torch.Size) -> torch.Tensor | None:
        """sum of scale * (up @ down + diff) over `names`, in float32 on `device`, shaped `shape` (None: none)."""
        total = None
        for name in names:
            scale = self._buffers[f"{name}_scale"].to(device, torch.float32)
            up, down, diff = self.part(name, "up"), self.part(name, "down"), self.part(name, "diff")
            for term in (
                None if up is None else (up.to(device, torch.float32) @ down.to(device, torch.float32)),
                diff,
            ):
                if term is not None:
                    term = scale * term.to(device, torch.float32).reshape(shape)
                    total = term if total is None else total + term
        return total

    def bias_delta(self, names: Iterable[str], device: torch.device) -> torch.Tensor | None:
        """sum of scale * diff_b over `names`, in float32 on `device` (None: none)."""
        terms = [
            self._buffers[f"{name}_scale"].to(device, torch.float32) * diff_b.to(device, torch.float32)
            for name in names
            if (diff_b := self.part(name, "diff_b")) is not None
        ]
        return sum(terms) if terms else None


def _with_weight(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's output for `x` with `weight` in place of its own and no bias."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(layer.kernel_size) - 1]
        weight = weight.reshape(weight.shape[0], *layer.weight.shape[1:])
        return conv(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, weight, None, layer.eps)
    return F.linear(x, weight)


def _low_rank(layer: nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """up(down(x)): through the layer's own operation with A, then a 1x1 (or plain linear) B."""
    hidden = _with_weight(layer, x, down)
    if isinstance(layer, nn.modules.conv._ConvNd):
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(layer.kernel_size) - 1]
        return conv(hidden, up.reshape(*up.shape, *[1] * len(layer.kernel_size)))
    return F.linear(hidden, up)


def _side_branch(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: add each unfused adapter's update to the layer's output."""
    bank = getattr(layer, BANK)
    x = args[0]
    for name in bank.branch:
        scale = bank._buffers[f"{name}_scale"].to(x.dtype)
        down, up = bank.part(name, "down"), bank.part(name, "up")
        if up is not None:
            output = output + _low_rank(layer, x, down.to(x.dtype), up.to(x.dtype)) * scale
        diff = bank.part(name, "diff")
        if diff is not None:
            output = output + _with_weight(layer, x, diff.to(x.dtype)) * scale
        diff_b = bank.part(name, "diff_b")
        if diff_b is not None:
            channels_first = isinstance(layer, nn.modules.conv._ConvNd)
            shape = (-1, *[1] * len(layer.kernel_size)) if channels_first else (-1,)
            output = output + diff_b.to(x.dtype).reshape(shape) * scale
    return output


def banks(model: nn.Module) -> dict[str, LoraBank]:
    """The LoRA banks of `model` by layer name."""
    return {name: getattr(layer, BANK) for name, layer in adaptable_layers(model).items() if hasattr(layer, BANK)}


def add_adapter(model: nn.Module, name: str, updates: list[LoraUpdate], scale: float) -> None:
    """Attach one adapter's updates to `model`'s layers (on each layer's device, in its compute dtype)."""
    if not name.isidentifier():
        raise ValueError(f"adapter_name {name!r} must be a Python identifier (letters, digits, _)")
    layers = adaptable_layers(model)
    if not hasattr(model, "lora_order"):
        model.lora_order = []
    if name not in model.lora_order:
        model.lora_order.append(name)
    for update in updates:
        layer = layers[update.module]
        if not hasattr(layer, BANK):
            setattr(layer, BANK, LoraBank())
            layer.register_forward_hook(_side_branch)
        getattr(layer, BANK).add(name, update, scale, layer.weight.device, compute_dtype(layer))


def adapter_names(model: nn.Module) -> list[str]:
    """Adapters attached to `model`, in the order they were loaded."""
    present = {name for bank in banks(model).values() for name in bank.names}
    return [name for name in getattr(model, "lora_order", []) if name in present]


def set_scales(model: nn.Module, scales: dict[str, float]) -> None:
    """Set each named adapter's scale in place (0 disables it); fused adapters must be unfused first."""
    for bank in banks(model).values():
        for name, value in scales.items():
            if name not in bank.names:
                continue
            if name not in bank.branch:
                raise ValueError(
                    f"adapter {name!r} is fused into the weights; call unfuse_lora() before changing its scale"
                )
            bank._buffers[f"{name}_scale"].fill_(float(value))


def _write(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Copy `value` into `tensor` in place, converted to its dtype and device."""
    with torch.no_grad():
        tensor.data.copy_(value)


def fuse(model: nn.Module, names: Iterable[str] | None = None) -> int:
    """Add the named (default: all) adapters' updates into the weights; returns the layers changed."""
    layers = adaptable_layers(model)
    chosen = {name: [n for n in bank.branch if names is None or n in names] for name, bank in banks(model).items()}
    gguf = [name for name, fused in chosen.items() if fused and isinstance(layers[name], GGUFLinear)]
    if gguf:
        raise ValueError(
            f"fuse_lora cannot requantise GGUF weights ({gguf[0]}, ...); the adapters keep running as a side "
            "branch, which gives the same result"
        )
    fp8 = 0
    for layer_name, fused in chosen.items():
        if not fused:
            continue
        layer, bank = layers[layer_name], getattr(layers[layer_name], BANK)
        if bank.backup is not None:
            raise ValueError(f"{layer_name} has fused adapters already; call unfuse_lora() first")
        weight = layer.weight.data
        delta = bank.delta(fused, weight.device, weight.shape)
        bias_delta = bank.bias_delta(fused, weight.device)
        bank.backup = {}
        if bias_delta is not None:
            bank.backup["bias"] = layer.bias.data.cpu().clone()
            _write(layer.bias, layer.bias.data.float() + bias_delta.to(layer.bias.device))
        if delta is not None:
            bank.backup["weight"] = weight.cpu().clone()
        if delta is not None and isinstance(layer, FP8Linear):
            bank.backup["weight_scale"] = layer.weight_scale.data.cpu().clone()
            merged = weight.float() * layer.weight_scale.data.float() + delta
            quantized, scale = quantize_per_tensor(merged)
            _write(layer.weight, quantized)
            _write(layer.weight_scale, scale)
            fp8 += 1
        elif delta is not None:
            _write(layer.weight, weight.float() + delta)
        bank.branch = [name for name in bank.branch if name not in fused]
    if fp8:
        logger.info("fuse_lora: {} FP8 layers requantised per tensor with new scales (unfuse_lora restores them)", fp8)
    return sum(bool(fused) for fused in chosen.values())


def unfuse(model: nn.Module) -> None:
    """Put back the weights saved by `fuse` and run the adapters as a side branch again."""
    layers = adaptable_layers(model)
    for layer_name, bank in banks(model).items():
        if bank.backup is None:
            continue
        layer = layers[layer_name]
        for attr, original in bank.backup.items():
            _write(getattr(layer, attr), original)
        bank.backup = None
        bank.branch = list(bank.names)


def remove_adapters(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Detach the named adapters (default: all), unfusing first; layers left without adapters lose their bank."""
    unfuse(model)
    for layer_name, layer in adaptable_layers(model).items():
        if not hasattr(layer, BANK):
            continue
        bank = getattr(layer, BANK)
        for name in [n for n in bank.names if names is None or n in names]:
            bank.remove(name)
        if not bank.names:
            delattr(layer, BANK)
            for key, hook in list(layer._forward_hooks.items()):
                if hook is _side_branch:
                    del layer._forward_hooks[key]
