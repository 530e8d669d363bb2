"""FP8 weights in the official HunyuanImage-2.1 format, computed two ways.

A converted linear layer keeps `weight` as float8_e4m3fn (same shape), `weight_scale`, a 0-dim
float32 multiplier (weight ~= weight_fp8 * weight_scale), and its `bias`. Its `compute` picks the matmul:
- "dequant" (the official): the weight is dequantized into the activation dtype and multiplied there;
- "scaled_mm": the activations are quantized to e4m3 too, with a dynamic scale per token (amax / 448;
  per tensor where the device's `torch._scaled_mm` has no row-wise scales), and `torch._scaled_mm`
  multiplies the two FP8 operands on FP8 tensor cores, applying both scales and the bias, in the activation dtype.
None (the default) is "dequant": the official FP8 numerics, so the images equal the official FP8 pipeline's.
"scaled_mm" (sm_89+ GPUs, or the CPU) is opt-in: quantizing the activations too is faster on FP8 tensor cores but
moves the output further from bf16 (on the tiny test DiT 0.10 of its magnitude against 0.05 for "dequant"), so
it changes the image, and no GPU run has yet measured by how much at full size.
"""

import functools
from collections.abc import Collection, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
SCALE_SUFFIX = ".weight_scale"
FP8_COMPUTE_MODES = ("scaled_mm", "dequant")


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _rowwise_scales(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` takes one scale per row here (the CPU; CUDA from sm_90)."""
    return device.type != "cuda" or _cuda_capability(device.index) >= (9, 0)


def quantize_activations(x: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 x, float32 scale) with x ~= fp8 * scale; the scale is (M, 1) per token (row) or 0-dim per tensor.

    The largest magnitude maps to 448; no value is read back to the host.
    """
    x_float = x.float()
    amax = x_float.abs().amax(dim=-1, keepdim=True) if per_token else x_float.abs().amax()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    return (x_float / scale).clamp(min=-FP8_MAX, max=FP8_MAX).to(FP8_DTYPE), scale


def scaled_mm_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ (weight * weight_scale).T + bias with both operands in e4m3 through `torch._scaled_mm`.

    The result is in x's dtype, or in the autocast dtype under autocast (as F.linear would give).
    """
    device_type = x.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    # row-wise scales: bf16 results only on CUDA
    per_token = _rowwise_scales(x.device) and (device_type != "cuda" or out_dtype == torch.bfloat16)
    x_2d = x.reshape(-1, x.shape[-1])
    x_fp8, x_scale = quantize_activations(x_2d, per_token)
    w_scale = weight_scale.float().reshape(1, 1).repeat(1, weight.shape[0]) if per_token else weight_scale.float()
    out = torch._scaled_mm(
        x_fp8,
        weight.t(),
        x_scale,
        w_scale,
        bias=None if bias is None else bias.to(out_dtype),
        out_dtype=out_dtype,
    )
    return out.reshape(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Module):
    """A linear layer whose weight is stored per-tensor scaled in float8_e4m3fn.

    `compute`: "scaled_mm", "dequant" or None ("dequant"); see the module docstring.
    """

    compute: str | None = None

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

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype to feed this layer when the caller has no other: the bias's (the model's load dtype)."""
        return self.bias.dtype if self.bias is not None else torch.bfloat16

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.compute or "dequant"
        # torch._scaled_mm needs both matrix dimensions divisible by 16
        if compute == "scaled_mm" and self.in_features % 16 == 0 and self.out_features % 16 == 0:
            return scaled_mm_linear(x, self.weight, self.weight_scale, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def set_fp8_compute(model: nn.Module, compute: str | None) -> int:
    """Set how every FP8Linear of `model` multiplies ("scaled_mm", "dequant", or None: "dequant"); returns how many."""
    if compute is not None and compute not in FP8_COMPUTE_MODES:
        raise ValueError(f"fp8_compute {compute!r} is unknown; choose 'scaled_mm', 'dequant' or None (dequant)")
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for layer in layers:
        layer.compute = compute
    return len(layers)


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
