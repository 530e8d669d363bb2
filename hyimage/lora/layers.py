"""LoRA adapters on a model's linear layers, run as a side branch or fused into the weights.

Each targeted layer (nn.Linear, FP8Linear or GGUFLinear) gets a child `lora` (a `LoraBank`) holding, per
adapter, `down` (A), `up` (B, alpha/rank folded in) and `scale`, all non-persistent buffers: the model's
state dict is unchanged, and they move with the layer (`.to()`, model offload, block streaming). A forward
hook adds `scale * (x @ A^T) @ B^T` to the layer's output, so FP8 and GGUF weights are never dequantised
for good. `scale` is a 0-dim tensor updated in place, so a compiled model (`torch.compile`) does not
recompile when only a scale changes.

Fusing adds `scale * B @ A` to the weights (in float32, then back to the weight's dtype; an FP8 weight is
requantised per tensor with a new scale) and keeps the original weights in host memory, so unfusing
restores them bit for bit. GGUF weights cannot be requantised in torch: fusing them is refused.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn

from hyimage.lora.keys import LoraUpdate, linear_layers
from hyimage.models.dit.layers import compute_dtype
from hyimage.quantization.fp8 import FP8Linear, quantize_per_tensor
from hyimage.quantization.gguf import GGUFLinear

BANK = "lora"


class LoraBank(nn.Module):
    """The adapters of one linear layer: `<name>_down`, `<name>_up`, `<name>_scale` buffers (not saved)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.branch: list[str] = []
        self.backup: dict[str, torch.Tensor] | None = None

    def add(self, name: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        self.register_buffer(f"{name}_down", down, persistent=False)
        self.register_buffer(f"{name}_up", up, persistent=False)
        self.register_buffer(f"{name}_scale", torch.tensor(float(scale)), persistent=False)
        self.names.append(name)
        self.branch.append(name)

    def remove(self, name: str) -> None:
        for part in ("down", "up", "scale"):
            del self._buffers[f"{name}_{part}"]
        self.names.remove(name)
        if name in self.branch:
            self.branch.remove(name)

    def delta(self, names: Iterable[str], device: torch.device) -> torch.Tensor:
        """sum of scale * up @ down over `names`, in float32 on `device`."""
        total = None
        for name in names:
            up = self._buffers[f"{name}_up"].to(device, torch.float32)
            down = self._buffers[f"{name}_down"].to(device, torch.float32)
            term = self._buffers[f"{name}_scale"].to(device, torch.float32) * (up @ down)
            total = term if total is None else total + term
        return total


def _side_branch(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: add each unfused adapter's scale * (x @ A^T) @ B^T to the layer's output."""
    bank = getattr(layer, BANK)
    x = args[0]
    for name in bank.branch:
        down = bank._buffers[f"{name}_down"].to(x.dtype)
        up = bank._buffers[f"{name}_up"].to(x.dtype)
        output = output + F.linear(F.linear(x, down), up) * bank._buffers[f"{name}_scale"].to(x.dtype)
    return output


def banks(model: nn.Module) -> dict[str, LoraBank]:
    """The LoRA banks of `model` by layer name."""
    return {name: getattr(layer, BANK) for name, layer in linear_layers(model).items() if hasattr(layer, BANK)}


def add_adapter(model: nn.Module, name: str, updates: list[LoraUpdate], scale: float) -> None:
    """Attach one adapter's updates to `model`'s layers (on each layer's device, in its compute dtype)."""
    if not name.isidentifier():
        raise ValueError(f"adapter_name {name!r} must be a Python identifier (letters, digits, _)")
    layers = linear_layers(model)
    if not hasattr(model, "lora_order"):
        model.lora_order = []
    if name not in model.lora_order:
        model.lora_order.append(name)
    for update in updates:
        layer = layers[update.module]
        if not hasattr(layer, BANK):
            setattr(layer, BANK, LoraBank())
            layer.register_forward_hook(_side_branch)
        dtype, device = compute_dtype(layer), layer.weight.device
        getattr(layer, BANK).add(name, update.down.to(device, dtype), update.up.to(device, dtype), scale)


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


def fuse(model: nn.Module, names: Iterable[str] | None = None) -> int:
    """Add the named (default: all) adapters' updates into the weights; returns the layers changed."""
    layers = linear_layers(model)
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
        delta = bank.delta(fused, weight.device)
        if isinstance(layer, FP8Linear):
            bank.backup = {"weight": weight.cpu().clone(), "weight_scale": layer.weight_scale.data.cpu().clone()}
            merged = weight.float() * layer.weight_scale.data.float() + delta
            quantized, scale = quantize_per_tensor(merged)
            layer.weight.data, layer.weight_scale.data = quantized, scale.to(layer.weight_scale.device)
            fp8 += 1
        else:
            bank.backup = {"weight": weight.cpu().clone()}
            layer.weight.data = (weight.float() + delta).to(weight.dtype)
        bank.branch = [name for name in bank.branch if name not in fused]
    if fp8:
        logger.info("fuse_lora: {} FP8 layers requantised per tensor with new scales (unfuse_lora restores them)", fp8)
    return sum(bool(fused) for fused in chosen.values())


def unfuse(model: nn.Module) -> None:
    """Put back the weights saved by `fuse` and run the adapters as a side branch again."""
    layers = linear_layers(model)
    for layer_name, bank in banks(model).items():
        if bank.backup is None:
            continue
        layer = layers[layer_name]
        for attr, original in bank.backup.items():
            getattr(layer, attr).data = original.to(getattr(layer, attr).device)
        bank.backup = None
        bank.branch = list(bank.names)


def remove_adapters(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Detach the named adapters (default: all), unfusing first; layers left without adapters lose their bank."""
    unfuse(model)
    for layer_name, layer in linear_layers(model).items():
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
