"""Both VAEs built at full size on `meta` have exactly the released state dicts (from the manifests)."""

import pytest
import torch

from hyimage.models import AutoencoderKLConv3D, HunyuanVAE2D
from tests.fixtures.manifests import load_manifest

CASES = [(HunyuanVAE2D, "vae_2_1"), (AutoencoderKLConv3D, "vae_refiner")]


@pytest.mark.parametrize("model_cls,manifest_name", CASES)
def test_full_size_state_dict_equals_manifest(model_cls, manifest_name):
    manifest = load_manifest(manifest_name)
    with torch.device("meta"):
        model = model_cls(**manifest["config"])
    state = model.state_dict()
    expected = manifest["state_dict"]

    assert sorted(state) == sorted(expected)
    wrong = {key: (list(t.shape), expected[key][0]) for key, t in state.items() if list(t.shape) != expected[key][0]}
    assert wrong == {}
    assert sum(t.numel() for t in state.values()) == manifest["num_params"]


@pytest.mark.parametrize("model_cls,manifest_name", CASES)
def test_config_exposes_release_values(model_cls, manifest_name):
    manifest = load_manifest(manifest_name)
    with torch.device("meta"):
        model = model_cls(**manifest["config"], _class_name="ignored", _diffusers_version="0.0")
    for key, value in manifest["config"].items():
        got = getattr(model.config, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_compression_factors_at_full_size():
    vae = load_manifest("vae_2_1")["config"]
    refiner = load_manifest("vae_refiner")["config"]
    assert (vae["ffactor_spatial"], vae["latent_channels"]) == (32, 64)
    assert (refiner["ffactor_spatial"], refiner["ffactor_temporal"], refiner["latent_channels"]) == (16, 4, 32)
    with torch.device("meta"):
        model = HunyuanVAE2D(**vae)
        latent = model.encode(torch.empty(1, 3, 2048, 1024, device="meta")).latent_dist.mean
        image = model.decode(torch.empty(1, 64, 64, 32, device="meta")).sample
    assert tuple(latent.shape) == (1, 64, 64, 32)
    assert tuple(image.shape) == (1, 3, 2048, 1024)
