"""The released DiT files' fused layout (`img_attn_qkv`, `txt_attn_qkv`, `linear1`, `linear2`): loading, FP8 pairs
named either way, quantization while loading, and clear errors for mixed or partial layouts."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hyimage.errors import CheckpointError
from hyimage.loading.safetensors_io import SafetensorsReader
from hyimage.models import HYImageDiffusionTransformer
from hyimage.quantization.fp8 import convert_to_fp8_linear, fp8_linear_modules, quantize_per_tensor
from tests.fixtures.dit_layouts import fused_layout, fused_module_name
from tests.fixtures.dit_loading import TINY, assert_same_weights, run, save, tiny_inputs

load_dit = HYImageDiffusionTransformer.from_single_file

E4M3 = torch.float8_e4m3fn
BASE = dict(TINY, guidance_embed=False, use_meanflow=False)
REFINER = dict(
    TINY, patch_size=[1, 1, 1], in_channels=8, rope_dim_list=[4, 6, 6], glyph_byT5_v2=False
)
VARIANTS = {"base": BASE, "distilled": TINY, "refiner": REFINER}


def random_dit(config: dict, seed: int = 0) -> HYImageDiffusionTransformer:
    generator = torch.Generator().manual_seed(seed)
    model = HYImageDiffusionTransformer(**config)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def inputs(variant: str) -> dict:
    x = tiny_inputs()
    if variant == "base":
        del x["guidance"], x["timesteps_r"]
    if variant == "refiner":
        x["hidden_states"] = torch.randn(2, 8, 1, 4, 6, generator=torch.Generator().manual_seed(2))
        del x["byt5_text_states"], x["byt5_text_mask"]
    return x


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_file_loads_bit_identical_to_the_split_weights(variant, tmp_path):
    config = VARIANTS[variant]
    reference = random_dit(config)
    fused = fused_layout(reference.state_dict())
    assert "double_blocks.0.img_attn_qkv.weight" in fused and "single_blocks.1.linear2.weight" in fused
    assert not any("attn_q." in key or "linear1_" in key or "linear2.fc" in key for key in fused)
    loaded = load_dit(save(fused, tmp_path / "fused.safetensors"), config)
    assert_same_weights(loaded, reference)
    assert torch.equal(run(loaded, inputs(variant)), run(reference, inputs(variant)))

    bf16 = {key: tensor.to(torch.bfloat16) for key, tensor in reference.state_dict().items()}
    from_fused = load_dit(save(fused_layout(bf16), tmp_path / "fused_bf16.safetensors"), config)
    from_split = load_dit(save(bf16, tmp_path / "split_bf16.safetensors"), config)
    assert_same_weights(from_fused, from_split)


def test_fused_rows_are_read_straight_into_each_part(tmp_path, monkeypatch):
    """No fused tensor is held beside the model: every fused weight and bias is read by row ranges."""
    path = save(fused_layout(random_dit(TINY).state_dict()), tmp_path / "fused.safetensors")
    reads: list[tuple[str, object]] = []
    real_get = SafetensorsReader.get

    def recording_get(self, key, rows=None):
        reads.append((key, rows))
        return real_get(self, key, rows)

    monkeypatch.setattr(SafetensorsReader, "get", recording_get)
    load_dit(path, TINY)
    fused_reads = [(key, rows) for key, rows in reads if key.startswith(("double_blocks", "single_blocks"))
                   and ("attn_qkv." in key or ".linear1." in key)]
    assert len(fused_reads) == 2 * 2 * 2 * 3 + 2 * 2 * 4  # blocks x (img, txt) x (weight, bias) x parts, single
    assert all(rows is not None for _, rows in fused_reads)
    hidden = TINY["hidden_size"]
    assert ("single_blocks.0.linear1.weight", (3 * hidden, None)) in fused_reads


def fp8_split_state(model: HYImageDiffusionTransformer) -> tuple[dict, dict]:
    """The official FP8 pair of `model` in the split layout: (weights with float8 linears, {module: scale})."""
    names = fp8_linear_modules(model)
    convert_to_fp8_linear(model, names)
    state = model.state_dict()
    scales = {name: state.pop(name + ".weight_scale") for name in names}
    return state, scales


def test_fp8_pair_fused_weights_with_split_scale_names(tmp_path):
    bf16 = random_dit(TINY).to(torch.bfloat16)
    weights, scales = fp8_split_state(bf16)
    split = load_dit(save(weights, tmp_path / "split_fp8.safetensors"), TINY, dtype=torch.float32,
                     fp8_scale=save(scales, tmp_path / "split_scale.safetensors"))
    fused_weights = fused_layout(weights)
    assert fused_weights["double_blocks.0.img_attn_qkv.weight"].dtype == E4M3
    fused = load_dit(save(fused_weights, tmp_path / "fused_fp8.safetensors"), TINY, dtype=torch.float32,
                     fp8_scale=tmp_path / "split_scale.safetensors")
    assert_same_weights(fused, split)
    assert torch.equal(run(fused, tiny_inputs()), run(split, tiny_inputs()))


def test_fp8_pair_with_fused_scale_names_gives_each_part_the_fused_scale(tmp_path):
    """A scale file keyed `...img_attn_qkv` / `...linear1` / `...linear2`: one per-tensor scale per fused module."""
    bf16_state = fused_layout(random_dit(TINY).to(torch.bfloat16).state_dict())
    fused_names = sorted({fused_module_name(name) for name in fp8_linear_modules(random_dit(TINY))})
    scales = {}
    for name in fused_names:
        bf16_state[name + ".weight"], scales[name] = quantize_per_tensor(bf16_state[name + ".weight"])
    assert "double_blocks.1.txt_attn_qkv" in scales and "single_blocks.0.linear1" in scales
    loaded = load_dit(save(bf16_state, tmp_path / "fp8.safetensors"), TINY, dtype=torch.float32,
                      fp8_scale=save(scales, tmp_path / "scale.safetensors"))
    state = loaded.state_dict()
    hidden = TINY["hidden_size"]
    fused_q = bf16_state["double_blocks.1.txt_attn_qkv.weight"]
    assert torch.equal(state["double_blocks.1.txt_attn_k.weight"].view(torch.uint8),
                       fused_q[hidden : 2 * hidden].view(torch.uint8))
    fused_linear1 = bf16_state["single_blocks.0.linear1.weight"]
    assert torch.equal(state["single_blocks.0.linear1_mlp.weight"].view(torch.uint8),
                       fused_linear1[3 * hidden :].view(torch.uint8))
    for part in ("linear1_q", "linear1_k", "linear1_v", "linear1_mlp"):
        assert torch.equal(state[f"single_blocks.0.{part}.weight_scale"], scales["single_blocks.0.linear1"])
    assert torch.equal(state["single_blocks.1.linear2.fc.weight_scale"], scales["single_blocks.1.linear2"])
    assert torch.isfinite(run(loaded, tiny_inputs()).float()).all()


def test_quantizing_a_fused_file_while_loading_equals_quantizing_the_split_file(tmp_path):
    bf16 = {key: t.to(torch.bfloat16) for key, t in random_dit(TINY).state_dict().items()}
    from_split = load_dit(save(bf16, tmp_path / "split.safetensors"), TINY, quantize_fp8=True)
    from_fused = load_dit(save(fused_layout(bf16), tmp_path / "fused.safetensors"), TINY, quantize_fp8=True)
    assert from_fused.double_blocks[0].img_attn_k.weight.dtype == E4M3
    assert_same_weights(from_fused, from_split)


@pytest.fixture(scope="module")
def fused_state() -> dict[str, torch.Tensor]:
    return fused_layout(random_dit(TINY).state_dict())


def write(state: dict, path: Path) -> Path:
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
    return path


def test_a_block_with_both_layouts_is_refused_naming_block_and_keys(fused_state, tmp_path):
    state = dict(fused_state, **{"double_blocks.1.img_attn_q.weight": torch.zeros(32, 32)})
    with pytest.raises(CheckpointError, match=r"mixed.safetensors: block double_blocks\.1 mixes .*img_attn_qkv.*"
                                              r"img_attn_q\b"):
        load_dit(write(state, tmp_path / "mixed.safetensors"), TINY)


def test_blocks_of_different_layouts_are_refused(fused_state, tmp_path):
    split = random_dit(TINY).state_dict()
    state = {key: t for key, t in fused_state.items() if not key.startswith("single_blocks.1.")}
    state.update({key: t for key, t in split.items() if key.startswith("single_blocks.1.")})
    with pytest.raises(CheckpointError, match=r"some blocks use the released fused layout .*single_blocks\.0.*"
                                              r"split layout \(single_blocks\.1\)"):
        load_dit(write(state, tmp_path / "halves.safetensors"), TINY)


def test_a_block_with_neither_layout_is_refused(fused_state, tmp_path):
    state = {key: t for key, t in fused_state.items() if not key.startswith("double_blocks.0.img_attn_qkv")
             and not key.startswith("double_blocks.0.txt_attn_qkv")}
    with pytest.raises(CheckpointError, match=r"block double_blocks\.0 has neither fused"):
        load_dit(write(state, tmp_path / "neither.safetensors"), TINY)


def test_a_partial_fused_block_names_what_is_missing(fused_state, tmp_path):
    state = {key: t for key, t in fused_state.items() if key != "single_blocks.1.linear1.bias"}
    with pytest.raises(CheckpointError, match=r"(?s)partial.safetensors.*4 missing keys.*single_blocks\.1\.linear1_q"
                                              r"\.bias.*released fused layout"):
        load_dit(write(state, tmp_path / "partial.safetensors"), TINY)


def test_scale_file_errors_name_the_module(tmp_path):
    weights, scales = fp8_split_state(random_dit(TINY).to(torch.bfloat16))
    weights_path = write(fused_layout(weights), tmp_path / "fp8.safetensors")
    extra = dict(scales, **{"double_blocks.0.img_attn_qkv_extra": torch.tensor(1.0)})
    with pytest.raises(CheckpointError, match=r"(?s)unexpected key.*img_attn_qkv_extra\.weight_scale.*extra_scale"):
        load_dit(weights_path, TINY, fp8_scale=write(extra, tmp_path / "extra_scale.safetensors"))
    missing = {name: scale for name, scale in scales.items() if name != "single_blocks.1.linear2.fc"}
    with pytest.raises(CheckpointError, match=r"(?s)1 missing key.*single_blocks\.1\.linear2\.fc\.weight_scale"):
        load_dit(weights_path, TINY, fp8_scale=write(missing, tmp_path / "missing_scale.safetensors"))
    mixed = {fused_module_name(name) if "double_blocks.0." in name else name: s for name, s in scales.items()}
    mixed["double_blocks.0.img_attn_q"] = scales["double_blocks.0.img_attn_q"]
    with pytest.raises(CheckpointError, match=r"mixed_scale.safetensors: block double_blocks\.0 mixes"):
        load_dit(weights_path, TINY, fp8_scale=write(mixed, tmp_path / "mixed_scale.safetensors"))
