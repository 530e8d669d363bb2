"""FP8 weight-only storage in the official HunyuanImage-2.1 format.

A converted linear layer keeps `weight` as float8_e4m3fn (same shape), `weight_scale`, a 0-dim
float32 multiplier (weight ~= weight_fp8 * weight_scale), and its `bias`; the forward pass
dequantizes the weight into the activation dtype and computes in that dtype.
"""

from collections.abc import Collection, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
SCALE_SUFFIX = ".weight_scale"


class FP8Linear(nn.Module):
    """A linear layer whose weight is stored per-tensor scaled in float8_e4m3fn."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        weight = torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones((), dtype=torch.float32, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """The FP8 counterpart of `linear`: placeholders on meta, else its weight quantized per tensor."""
        has_bias = linear.bias is not None
        fp8 = cls(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            device=linear.weight.device,
            bias_dtype=linear.bias.dtype if has_bias else None,
        )
        if has_bias:
            fp8.bias = linear.bias
        if not linear.weight.is_meta:
            weight, scale = quantize_per_tensor(linear.weight.detach())
            fp8.weight = nn.Parameter(weight, requires_grad=False)
            fp8.weight_scale = nn.Parameter(scale, requires_grad=False)
        return fp8

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, 0-dim float32 scale) with weight ~= fp8 * scale.

    The official numerics: amax = max |w| in the weight's dtype, q = clamp(w * (448 / amax)) cast to
    e4m3fn, scale = 1 / (448 / amax) in float32. A meta weight gives meta results.
    """
    if weight.is_meta:
        return torch.empty_like(weight, dtype=FP8_DTYPE), torch.empty((), dtype=torch.float32, device="meta")
    if weight.numel() == 0:
        amax = torch.tensor(16.0, dtype=weight.dtype, device=weight.device)
    else:
        low, high = weight.aminmax()
        amax = torch.maximum(low.abs(), high.abs())
    if torch.isnan(amax) or amax <= 0:
        raise ValueError(f"cannot quantize a weight whose largest magnitude is {amax.item()} (all zero or NaN)")
    multiplier = FP8_MAX / amax.clamp(min=1e-12)
    quantized = (weight * multiplier).clamp_(min=-FP8_MAX, max=FP8_MAX).to(FP8_DTYPE)
    return quantized, multiplier.float().reciprocal()


def fp8_linear_modules(model: nn.Module) -> list[str]:
    """Names of the linear layers the official FP8 conversion replaces: those in the double/single
    stream blocks, except embedders."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, FP8Linear))
        and ("double_block" in name or "single_blocks" in name)
        and "embed" not in name
    ]


def convert_to_fp8_linear(model: nn.Module, module_names: Sequence[str]) -> nn.Module:
    """Replace each named nn.Linear of `model` by an FP8Linear (in place; works on meta)."""
    for name in module_names:
        linear = model.get_submodule(name)
        if isinstance(linear, FP8Linear):
            continue
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"module {name!r} is a {type(linear).__name__}, not an nn.Linear; it cannot become FP8")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, FP8Linear.from_linear(linear))
    return model


def quantizing(
    stream: Iterator[tuple[str, torch.Tensor]], module_names: Collection[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass (key, tensor) pairs through, quantizing `<name>.weight` of each listed module that is
    not float8 yet and adding its `<name>.weight_scale`."""
    names = set(module_names)
    for key, tensor in stream:
        name, _, attr = key.rpartition(".")
        if attr == "weight" and name in names and tensor.dtype != FP8_DTYPE:
            weight, scale = quantize_per_tensor(tensor)
            del tensor
            yield key, weight
            yield name + SCALE_SUFFIX, scale
        else:
            yield key, tensor
