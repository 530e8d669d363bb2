"""FP8 compute through torch._scaled_mm (e4m3 activations x e4m3 weights), checked on the CPU."""

import pytest
import torch
from torch import nn

from hyimage.quantization.fp8 import (
    FP8_DTYPE,
    FP8Linear,
    convert_to_fp8_linear,
    fp8_linear_modules,
    set_fp8_compute,
)
from tests.fixtures.dit_loading import run, tiny_dit, tiny_inputs
from tests.fixtures.numerics import max_rel_error


def by_hand(x: torch.Tensor, layer: FP8Linear) -> torch.Tensor:
    """The scaled_mm product written out: each row of x scaled so its largest magnitude is 448, cast to e4m3,
    multiplied in float64 with the stored e4m3 weight, both scales applied, bias added."""
    x = x.double()
    row_scale = x.abs().amax(dim=1, keepdim=True) / 448
    x_fp8 = (x / row_scale).clamp(-448, 448).float().to(FP8_DTYPE)
    product = x_fp8.double() @ layer.weight.double().t()
    return product * row_scale * layer.weight_scale.double() + layer.bias.double()


def test_scaled_mm_equals_the_product_of_the_quantised_tensors() -> None:
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(nn.Linear(64, 48).to(torch.bfloat16))
    layer.compute = "scaled_mm"
    x = (torch.randn(5, 7, 64) * torch.logspace(-2, 1, 7)[:, None]).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 7, 48)
    reference = by_hand(x.reshape(-1, 64), layer).reshape(5, 7, 48)
    # one bf16 rounding of the result (2^-9 relative) apart, per element
    assert ((out.double() - reference).abs() <= 2**-8 * reference.abs() + 1e-6).all()
    # a float32 input under autocast gives the autocast dtype, as F.linear does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.float()).dtype == torch.bfloat16
    # and not the weight-only product: the activations are quantised too
    layer.compute = "dequant"
    assert not torch.equal(layer(x), out)


def test_default_is_the_official_dequant_and_names_are_checked() -> None:
    layer = FP8Linear.from_linear(nn.Linear(64, 48))
    x = torch.randn(3, 64)
    assert layer.compute is None
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantized_weight(torch.float32), layer.bias))
    with pytest.raises(ValueError, match="fp8_compute"):
        set_fp8_compute(nn.Linear(2, 2), "fast")


@torch.no_grad()
def test_scaled_mm_model_stays_close_to_bf16() -> None:
    """The tiny FP8 DiT against the same DiT in bf16 (same inputs, bf16 activations).

    Weight-only FP8 moves each weight by up to 2^-4 of itself; e4m3 activations add the same bound per input,
    so to first order the error of a quantised layer doubles, and five such layers lie in series on every
    token's path: bound 2 * 5 * 2^-4. Measured here: dequant 0.048, scaled_mm 0.101 of the largest output.
    """
    reference_model = tiny_dit(torch.bfloat16)
    inputs = {
        key: value.to(torch.bfloat16) if value.is_floating_point() and key != "timestep" else value
        for key, value in tiny_inputs().items()
    }
    reference = run(reference_model, inputs)
    fp8_model = convert_to_fp8_linear(tiny_dit(torch.bfloat16), fp8_linear_modules(reference_model))
    errors = {}
    for compute in ("dequant", "scaled_mm"):
        assert set_fp8_compute(fp8_model, compute) == 2 * 14 + 2 * 6
        errors[compute] = max_rel_error(run(fp8_model, inputs), reference)
    assert 0 < errors["dequant"] <= 5 * 2**-4
    assert 0 < errors["scaled_mm"] <= 2 * 5 * 2**-4
