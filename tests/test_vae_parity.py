"""Tiny VAEs (real compression factors and latent channels) against diffusers with the same weights.

The oracle is diffusers' AutoencoderKLHunyuanImage / AutoencoderKLHunyuanImageRefiner, fed our weights through
hyimage.loading.vae_diffusers_keys (the facts of diffusers' conversion script).
"""

import pytest
import torch

from hyimage.loading.vae_diffusers_keys import refiner_vae_key_map, vae_2d_key_map
from hyimage.models import AutoencoderKLConv3D, HunyuanVAE2D
from hyimage.models.vae.base import tiled_decode
from tests.fixtures.numerics import TOLERANCE, max_rel_error
from tests.fixtures.vae_fixtures import random_vae_state_dict, tiny_refiner_vae_config, tiny_vae_2d_config

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_2d_pair():
    config = tiny_vae_2d_config()
    state = random_vae_state_dict(HunyuanVAE2D, config, seed=1)
    ours = HunyuanVAE2D(**config).eval()
    ours.load_state_dict(state)
    reference = diffusers.AutoencoderKLHunyuanImage(
        in_channels=3,
        out_channels=3,
        latent_channels=64,
        block_out_channels=config["block_out_channels"],
        layers_per_block=config["layers_per_block"],
        spatial_compression_ratio=32,
        sample_size=config["sample_size"],
        scaling_factor=config["scaling_factor"],
    ).eval()
    key_map = vae_2d_key_map(state, config["layers_per_block"], num_resample_levels=5)
    reference.load_state_dict({key_map[key]: value for key, value in state.items()}, strict=True)
    return ours, reference


@pytest.fixture(scope="module")
def refiner_pair():
    config = tiny_refiner_vae_config()
    state = random_vae_state_dict(AutoencoderKLConv3D, config, seed=2)
    ours = AutoencoderKLConv3D(**config).eval()
    ours.load_state_dict(state)
    reference = diffusers.AutoencoderKLHunyuanImageRefiner(
        latent_channels=32,
        block_out_channels=config["block_out_channels"],
        layers_per_block=config["layers_per_block"],
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
    ).eval()
    key_map = refiner_vae_key_map(state)
    reference.load_state_dict({key_map[key]: value for key, value in state.items()}, strict=True)
    return ours, reference


@torch.no_grad()
def test_vae_2d_encode_matches_diffusers_4d_and_5d(vae_2d_pair):
    ours, reference = vae_2d_pair
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    expected = reference.encode(images).latent_dist
    posterior = ours.encode(images).latent_dist
    assert posterior.mean.shape == (2, 64, 2, 3)
    assert max_rel_error(posterior.mean, expected.mean) < TOLERANCE
    assert max_rel_error(posterior.logvar, expected.logvar) < TOLERANCE
    assert max_rel_error(posterior.mode(), expected.mode()) < TOLERANCE

    (posterior_5d,) = ours.encode(images.unsqueeze(2), return_dict=False)
    assert posterior_5d.mean.shape == (2, 64, 1, 2, 3)
    assert max_rel_error(posterior_5d.mean[:, :, 0], expected.mean) < TOLERANCE
    assert max_rel_error(posterior_5d.logvar[:, :, 0], expected.logvar) < TOLERANCE


@torch.no_grad()
def test_vae_2d_sample_uses_generator_like_diffusers(vae_2d_pair):
    ours, reference = vae_2d_pair
    images = torch.rand(1, 3, 32, 64) * 2 - 1
    expected = reference.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    got = ours.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    assert max_rel_error(got, expected) < TOLERANCE


@torch.no_grad()
def test_vae_2d_decode_matches_diffusers_4d_5d_and_sliced(vae_2d_pair):
    ours, reference = vae_2d_pair
    latents = torch.randn(2, 64, 3, 2)
    expected = reference.decode(latents).sample
    image = ours.decode(latents).sample
    assert image.shape == (2, 3, 96, 64)
    assert max_rel_error(image, expected) < TOLERANCE

    (image_5d,) = ours.decode(latents.unsqueeze(2), return_dict=False)
    assert image_5d.shape == (2, 3, 1, 96, 64)
    assert max_rel_error(image_5d[:, :, 0], expected) < TOLERANCE

    ours.enable_slicing()
    try:
        assert max_rel_error(ours.decode(latents).sample, expected) < TOLERANCE
    finally:
        ours.disable_slicing()


@torch.no_grad()
def test_vae_2d_rejects_bad_shapes(vae_2d_pair):
    ours, _ = vae_2d_pair
    with pytest.raises(ValueError, match="divisible by the VAE factor 32"):
        ours.encode(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"\(B, C, 1, H, W\)"):
        ours.decode(torch.zeros(1, 64, 2, 2, 2))


@torch.no_grad()
def test_refiner_vae_encode_and_decode_match_diffusers(refiner_pair):
    ours, reference = refiner_pair
    images = torch.rand(2, 3, 1, 48, 80) * 2 - 1
    expected = reference.encode(images).latent_dist
    posterior = ours.encode(images).latent_dist
    assert posterior.mean.shape == (2, 32, 1, 3, 5)
    assert max_rel_error(posterior.mean, expected.mean) < TOLERANCE
    assert max_rel_error(posterior.logvar, expected.logvar) < TOLERANCE

    latents = torch.randn(2, 32, 1, 5, 3)
    expected_images = reference.decode(latents).sample
    (decoded,) = ours.decode(latents, return_dict=False)
    assert decoded.shape == (2, 3, 1, 80, 48)
    assert max_rel_error(decoded, expected_images) < TOLERANCE


@torch.no_grad()
def test_refiner_vae_is_causal_in_time(refiner_pair):
    """The first latent frame depends on the first image frame only, and the first decoded frame on the first
    latent frame only (causal padding, first frame compressed alone, frame-causal attention)."""
    ours, _ = refiner_pair
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    latents = ours.encode(video).latent_dist.mean
    assert latents.shape == (1, 32, 2, 2, 2)
    first_only = ours.encode(video[:, :, :1]).latent_dist.mean
    assert max_rel_error(latents[:, :, :1], first_only) < TOLERANCE

    decoded = ours.decode(latents).sample
    assert decoded.shape == (1, 3, 5, 32, 32)
    assert max_rel_error(decoded[:, :, :1], ours.decode(latents[:, :, :1]).sample) < TOLERANCE


def test_tiled_decode_blends_to_the_whole_result_for_a_local_decoder():
    """With a decoder that only looks at each latent pixel (nearest upsampling), overlapping tiles blended
    with weights that sum to one reproduce the whole decode exactly, on a non-square latent."""

    def upsample(z: torch.Tensor) -> torch.Tensor:
        return z.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)

    latents = torch.randn(2, 3, 11, 17)
    tiled = tiled_decode(upsample, latents, tile=5, overlap=2, factor=4)
    assert tiled.shape == (2, 3, 44, 68)
    assert max_rel_error(tiled, upsample(latents)) < 1e-6


@torch.no_grad()
def test_tiling_is_off_by_default_and_only_splits_large_latents(vae_2d_pair):
    ours, reference = vae_2d_pair
    assert ours.use_tiling is False and ours.use_slicing is False
    latents = torch.randn(1, 64, 3, 2)
    ours.enable_tiling(tile_latent_size=4, tile_latent_overlap=1)
    try:
        assert max_rel_error(ours.decode(latents).sample, reference.decode(latents).sample) < TOLERANCE
        assert ours.decode(torch.randn(1, 64, 6, 5)).sample.shape == (1, 3, 192, 160)
    finally:
        ours.disable_tiling()


@torch.no_grad()
def test_refiner_tiled_decode_covers_the_image(refiner_pair):
    ours, reference = refiner_pair
    latents = torch.randn(1, 32, 1, 5, 3)
    ours.enable_tiling(tile_latent_size=3, tile_latent_overlap=1)
    try:
        tiled = ours.decode(latents).sample
    finally:
        ours.disable_tiling()
    whole = reference.decode(latents).sample
    assert tiled.shape == whole.shape == (1, 3, 1, 80, 48)
    assert max_rel_error(ours.decode(latents).sample, whole) < TOLERANCE
