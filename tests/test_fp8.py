"""FP8 weight-only storage in the official two-file format: quantization facts, loading, memory."""

from pathlib import Path

import pytest
import torch
from torch import nn

from hyimage.errors import CheckpointError
from hyimage.models import HYImageDiffusionTransformer
from hyimage.quantization.fp8 import (
    FP8Linear,
    convert_to_fp8_linear,
    fp8_linear_modules,
    quantize_per_tensor,
)
from tests.fixtures.dit_loading import TINY, run, save, tiny_dit, tiny_inputs
from tests.fixtures.manifests import load_manifest
from tests.fixtures.numerics import TOLERANCE, max_rel_error

load_dit = HYImageDiffusionTransformer.from_single_file

E4M3 = torch.float8_e4m3fn


def test_quantize_maps_the_largest_magnitude_to_448():
    weight = torch.randn(64, 48) * 0.03
    weight[5, 7] = -0.5
    fp8, scale = quantize_per_tensor(weight)
    assert fp8.dtype == E4M3 and fp8.shape == weight.shape
    assert scale.dtype == torch.float32 and scale.shape == ()
    assert fp8[5, 7].float().item() == -448.0
    assert fp8.float().abs().max().item() == 448.0
    assert scale.item() == pytest.approx(0.5 / 448, rel=1e-6)


def test_quantization_error_is_within_e4m3_rounding():
    """e4m3 keeps 3 mantissa bits: a normal value (>= 2^-6 after scaling) rounds within 2^-4 of itself,
    a subnormal one within half the subnormal step 2^-9; in weight units both are multiplied by the scale."""
    weight = torch.randn(128, 96) * torch.logspace(-4, 0, 96)
    fp8, scale = quantize_per_tensor(weight)
    error = (fp8.float() * scale - weight).abs()
    bound = torch.maximum(weight.abs() * 2**-4, torch.full_like(weight, 2**-10) * scale)
    assert (error <= bound * (1 + 1e-6)).all()
    assert (error > 0).any()


def test_quantize_rejects_an_all_zero_weight():
    with pytest.raises(ValueError, match="largest magnitude"):
        quantize_per_tensor(torch.zeros(4, 4))


def test_fp8_linear_computes_with_the_dequantized_weight():
    linear = nn.Linear(16, 8)
    fp8 = FP8Linear.from_linear(linear)
    x = torch.randn(3, 16)
    dequantized = fp8.weight.float() * fp8.weight_scale
    assert torch.equal(fp8(x), nn.functional.linear(x, dequantized, linear.bias))
    assert fp8(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert list(fp8.state_dict()) == ["weight", "weight_scale", "bias"]


@pytest.mark.parametrize(
    "variant, manifest",
    [
        ("hunyuanimage-v2.1", "dit_base"),
        ("hunyuanimage-v2.1-distilled", "dit_distilled"),
        ("hunyuanimage-refiner", "dit_refiner"),
    ],
)
def test_converted_modules_and_keys_match_the_manifest(variant, manifest):
    expected = load_manifest(manifest)
    model = HYImageDiffusionTransformer.from_config(variant, device="meta")
    names = fp8_linear_modules(model)
    assert names == expected["fp8_linear_modules"]
    convert_to_fp8_linear(model, names)
    state = model.state_dict()
    scales = {name + ".weight_scale" for name in names}
    assert set(state) == set(expected["state_dict"]) | scales
    for name in names:
        assert state[name + ".weight"].dtype == E4M3
        assert list(state[name + ".weight"].shape) == expected["state_dict"][name + ".weight"][0]
        assert state[name + ".weight_scale"].dtype == torch.float32 and state[name + ".weight_scale"].shape == ()


def write_official_fp8_pair(model: nn.Module, directory: Path, scales_in_main: bool = True) -> tuple[Path, Path]:
    """What the official code releases: `<stem>_fp8.safetensors` (the converted model's state dict)
    and `<stem>_fp8_scale.safetensors` (module name -> scale)."""
    names = fp8_linear_modules(model)
    convert_to_fp8_linear(model, names)
    state = model.state_dict()
    scales = {name: state[name + ".weight_scale"] for name in names}
    if not scales_in_main:
        state = {key: value for key, value in state.items() if not key.endswith(".weight_scale")}
    return save(state, directory / "tiny_fp8.safetensors"), save(scales, directory / "tiny_fp8_scale.safetensors")


@pytest.fixture(scope="module")
def bf16_model() -> nn.Module:
    return tiny_dit(torch.bfloat16)


@pytest.fixture(scope="module")
def fp8_pair(bf16_model, tmp_path_factory) -> tuple[Path, Path]:
    return write_official_fp8_pair(tiny_dit(torch.bfloat16), tmp_path_factory.mktemp("fp8"))


def test_fp8_pair_loads_as_float8_and_stays_close_to_bf16(bf16_model, fp8_pair):
    path, scale_path = fp8_pair
    loaded = load_dit(path, TINY, fp8_scale=scale_path, dtype=torch.float32)
    names = fp8_linear_modules(loaded)
    assert len(names) == 2 * 14 + 2 * 6
    for name in names:
        module = loaded.get_submodule(name)
        assert isinstance(module, FP8Linear)
        assert module.weight.dtype == E4M3
        assert module.weight.untyped_storage().nbytes() == module.weight.numel()
        assert module.weight_scale.dtype == torch.float32
    stored = sum(loaded.get_submodule(name).weight.untyped_storage().nbytes() for name in names)
    assert stored == sum(bf16_model.get_submodule(name).weight.numel() for name in names)
    others = {p.dtype for n, p in loaded.named_parameters() if n.rpartition(".")[0] not in names}
    assert others == {torch.float32}

    # Loading is exact: the FP8 model computes what the bf16 model computes with the stored weights.
    dequantized = tiny_dit(torch.bfloat16).float()
    for name in names:
        module = loaded.get_submodule(name)
        dequantized.get_submodule(name).weight.data = module.weight.float() * module.weight_scale
    fp8_output = run(loaded, tiny_inputs())
    assert max_rel_error(fp8_output, run(dequantized, tiny_inputs())) <= TOLERANCE

    # Against bf16: every weight moves by at most 2^-4 of itself (e4m3 rounding), so each linear layer's
    # output moves by at most 2^-4 * |W| |x|. Five quantized layers lie in series on the path of every
    # token (modulation, q/k/v, projection, MLP in, MLP out), and to first order the relative errors of
    # layers in series add: bound 5 * 2^-4. Random-sign rounding keeps the observed value near 2^-4.
    error = max_rel_error(fp8_output, run(tiny_dit(torch.bfloat16).float(), tiny_inputs()))
    assert 0 < error <= 5 * 2**-4


def test_fp8_dit_loaded_in_float32_runs_in_float32(fp8_pair):
    """The pipeline's DiT call on an FP8 pair loaded with dtype=torch.float32: float32 compute, FP8 weights
    dequantized into it (it used to feed bf16 latents to the float32 patch embedding)."""
    from hyimage.diffusion.pipelines.parts import autocast_dtype, run_dit

    loaded = load_dit(fp8_pair[0], TINY, fp8_scale=fp8_pair[1], dtype=torch.float32)
    assert autocast_dtype(loaded) is None
    x = tiny_inputs()
    out = run_dit(loaded, autocast_dtype(loaded), x["hidden_states"], x["timestep"], x["text_states"],
                  x["encoder_attention_mask"], x["byt5_text_states"], x["byt5_text_mask"], x["guidance"],
                  x["timesteps_r"])
    assert out.dtype == torch.float32
    assert torch.equal(out, run(loaded, x))
    bf16 = load_dit(fp8_pair[0], TINY, fp8_scale=fp8_pair[1])
    assert autocast_dtype(bf16) == torch.bfloat16


def test_fp8_linear_error_is_bounded_per_output():
    """|y_fp8 - y| <= 2^-4 * (|W| @ |x|) for each output, from the per-weight bound (normal e4m3 range)."""
    linear = nn.Linear(64, 32, bias=False)
    fp8 = FP8Linear.from_linear(linear)
    x = torch.randn(8, 64)
    error = (fp8(x) - linear(x)).abs()
    bound = 2**-4 * (x.abs() @ linear.weight.abs().T) + 2**-10 * fp8.weight_scale * x.abs().sum(-1, keepdim=True)
    assert (error <= bound * 1.0001).all()


def test_scales_come_from_the_scale_file_when_the_checkpoint_lacks_them(bf16_model, fp8_pair, tmp_path):
    path, scale_path = fp8_pair
    with_scales = load_dit(path, TINY, fp8_scale=scale_path).state_dict()
    main_only, scale_only = write_official_fp8_pair(tiny_dit(torch.bfloat16), tmp_path, scales_in_main=False)
    from_scale_file = load_dit(main_only, TINY, fp8_scale=scale_only).state_dict()
    assert all(torch.equal(from_scale_file[k].float(), with_scales[k].float()) for k in with_scales)
    with pytest.raises(CheckpointError, match=r"tiny_fp8.safetensors holds float8 weights.*fp8_scale"):
        load_dit(main_only, TINY)
    with pytest.raises(FileNotFoundError, match=r"absent_scale.safetensors does not exist"):
        load_dit(main_only, TINY, fp8_scale=tmp_path / "absent_scale.safetensors")


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def test_quantizing_a_bf16_file_while_loading_equals_the_official_pair(bf16_model, fp8_pair, tmp_path):
    path, scale_path = fp8_pair
    bf16_path = save(bf16_model.state_dict(), tmp_path / "tiny.safetensors")
    quantized = load_dit(bf16_path, TINY, quantize_fp8=True).state_dict()
    official = load_dit(path, TINY, fp8_scale=scale_path).state_dict()
    assert list(quantized) == list(official)
    for key, tensor in official.items():
        assert quantized[key].dtype == tensor.dtype, key
        assert torch.equal(as_bytes(quantized[key]), as_bytes(tensor)), key
    with pytest.raises(CheckpointError, match=r"tiny.safetensors holds no float8 weights.*quantize_fp8=True"):
        load_dit(bf16_path, TINY, fp8_scale=scale_path)
