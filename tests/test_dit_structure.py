"""The three released DiT variants, built on `meta` at full size, against the official manifests and diffusers."""

from pathlib import Path

import pytest
import torch

from hyimage.loading.dit_diffusers_keys import diffusers_to_official, is_diffusers_layout, official_to_diffusers
from hyimage.loading.dit_fused_keys import dit_layout, fused_to_split, split_keys
from hyimage.models import HYImageDiffusionTransformer
from hyimage.models.dit.configs import DIT_CONFIGS, DiTConfig, resolve_dit_config
from tests.fixtures.dit_layouts import fused_layout
from tests.fixtures.dit_twins import diffusers_kwargs
from tests.utils import load_manifest

VARIANTS = {
    "hunyuanimage-v2.1": "dit_base",
    "hunyuanimage-v2.1-distilled": "dit_distilled",
    "hunyuanimage-refiner": "dit_refiner",
}


def build_meta(name: str) -> HYImageDiffusionTransformer:
    return HYImageDiffusionTransformer.from_config(name, device="meta", dtype=torch.bfloat16)


@pytest.mark.parametrize("name", VARIANTS)
def test_config_matches_manifest(name: str) -> None:
    manifest_config = load_manifest(VARIANTS[name])["config"]
    assert resolve_dit_config(name) == resolve_dit_config(manifest_config)


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_matches_manifest(name: str) -> None:
    manifest = load_manifest(VARIANTS[name])
    model = build_meta(name)
    ours = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    expected = {key: shape for key, (shape, _dtype) in manifest["state_dict"].items()}
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {key: shape for key, shape in ours.items() if shape != expected[key]} == {}
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], torch.nn.Linear) for name in manifest["fp8_linear_modules"])
    assert len(model.double_blocks) == 20 and len(model.single_blocks) == 40


@pytest.mark.parametrize("name", VARIANTS)
def test_diffusers_key_map_at_full_size(name: str) -> None:
    """The official->diffusers map gives exactly diffusers' keys and shapes, and inverts exactly."""
    from diffusers import HunyuanImageTransformer2DModel

    config = resolve_dit_config(name)
    state_dict = build_meta(name).state_dict()
    with torch.device("meta"):
        reference = HunyuanImageTransformer2DModel(**diffusers_kwargs(config)).state_dict()
    mapped = official_to_diffusers(state_dict)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert is_diffusers_layout(mapped) and not is_diffusers_layout(state_dict)
    reads = []
    back = dict(diffusers_to_official(list(mapped), lambda key: reads.append(key) or mapped[key]))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in state_dict.items()}
    assert sorted(reads) == sorted(mapped), "every diffusers tensor is read exactly once"


@pytest.mark.parametrize("name", VARIANTS)
def test_released_fused_layout_maps_onto_the_model_at_full_size(name: str) -> None:
    """The released layout, derived from the manifest (q/k/v and linear1 parts concatenated, linear2.fc renamed),
    is detected as fused and maps onto the model's keys exactly, every tensor read once, by rows where split."""
    manifest = load_manifest(VARIANTS[name])
    split = {key: torch.empty(shape, device="meta") for key, (shape, _) in manifest["state_dict"].items()}
    fused = fused_layout(split)
    hidden = manifest["config"]["hidden_size"]
    mlp = int(hidden * manifest["config"]["mlp_width_ratio"])
    assert fused["double_blocks.19.txt_attn_qkv.weight"].shape == (3 * hidden, hidden)
    assert fused["single_blocks.39.linear1.weight"].shape == (3 * hidden + mlp, hidden)
    assert fused["single_blocks.39.linear2.weight"].shape == (hidden, hidden + mlp)
    assert len(fused) == len(split) - 20 * 2 * 2 * 2 - 40 * 2 * 3

    assert dit_layout(Path(name), [key.rpartition(".")[0] for key in fused]) == "fused"
    reads = []

    def get_meta(key: str, rows: tuple[int, int | None] | None = None) -> torch.Tensor:
        reads.append(key)
        return fused[key] if rows is None else fused[key][slice(*rows)]

    model = build_meta(name)
    mapped = dict(fused_to_split(fused, get_meta, hidden_size=model.config.hidden_size))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert split_keys(fused) == set(model.state_dict())
    assert len(reads) == len(split)  # one read per model tensor: the parts of a fused tensor each read their rows


def test_diffusers_key_map_round_trip_values() -> None:
    state_dict = {
        "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight": torch.arange(24.0).reshape(6, 4),
        "final_layer.adaLN_modulation.1.bias": torch.arange(8.0),
        "double_blocks.3.txt_attn_q_norm.weight": torch.ones(4),
        "single_blocks.1.linear2.fc.weight": torch.zeros(2, 3),
    }
    mapped = official_to_diffusers(state_dict)
    assert torch.equal(
        mapped["context_embedder.token_refiner.refiner_blocks.0.attn.to_k.weight"],
        torch.arange(8.0, 16.0).reshape(2, 4),
    )
    assert torch.equal(mapped["norm_out.linear.bias"], torch.tensor([4.0, 5, 6, 7, 0, 1, 2, 3]))
    assert "transformer_blocks.3.attn.norm_added_q.weight" in mapped
    assert "single_transformer_blocks.1.proj_out.weight" in mapped
    back = dict(diffusers_to_official(mapped, mapped.__getitem__))
    assert back.keys() == state_dict.keys() and all(torch.equal(back[k], v) for k, v in state_dict.items())


def test_resolve_dit_config_errors() -> None:
    with pytest.raises(ValueError, match="hunyuanimage-v2.1"):
        resolve_dit_config("hunyuanimage-v3")
    with pytest.raises(ValueError, match="hiden_size"):
        resolve_dit_config({"hiden_size": 64})
    with pytest.raises(ValueError, match="rope_dim_list"):
        DiTConfig(hidden_size=64, heads_num=2, rope_dim_list=(16, 8))
    assert resolve_dit_config(DIT_CONFIGS["hunyuanimage-refiner"]) is not DIT_CONFIGS["hunyuanimage-refiner"]


