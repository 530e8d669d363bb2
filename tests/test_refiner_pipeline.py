"""HunyuanImageRefinerPipeline end to end on a tiny refiner DiT and a tiny causal 3-D VAE, alone and after the base stage."""

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image

from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImageOutput
from hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline import (
    HunyuanImageRefinerPipeline,
    channel_pairs_to_frames,
    frames_to_channel_pairs,
)
from tests.fixtures.diffusers_dit import diffusers_twin
from tests.fixtures.numerics import TOLERANCE, max_rel_error
from tests.fixtures.tiny_dit import TINY_CONFIGS, tiny_model
from tests.fixtures.tiny_pipeline import FakeTextEncoder, make_pipe, tiny_refiner_vae, tiny_vae

REFINER = "hunyuanimage-refiner"


@pytest.fixture(scope="module")
def refiner() -> HunyuanImageRefinerPipeline:
    return HunyuanImageRefinerPipeline(
        dit=tiny_model(TINY_CONFIGS[REFINER]),
        vae=tiny_refiner_vae(),
        text_encoder=FakeTextEncoder(),
        progress_bar=False,
    )


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_frame_pair_reorganisation_is_the_official_rearrange() -> None:
    latents = torch.randn(2, 3, 1, 4, 5)
    official = torch.cat((latents[:, :, :1], latents), dim=2)
    official = rearrange(official, "b c f h w -> b f c h w")
    official = rearrange(official, "b (f n) c h w -> b f (n c) h w", n=2)
    official = rearrange(official, "b f c h w -> b c f h w")
    assert torch.equal(frames_to_channel_pairs(latents), official)

    pairs = torch.randn(2, 6, 1, 4, 5)
    back = rearrange(pairs, "b c f h w -> b f c h w")
    back = rearrange(back, "b f (n c) h w -> b (f n) c h w", n=2)
    back = rearrange(back, "b f c h w -> b c f h w")[:, :, 1:]
    assert torch.equal(channel_pairs_to_frames(pairs), back)


@torch.no_grad()
def test_refines_any_image_to_the_requested_size_and_same_seed_same_image(refiner) -> None:
    image = random_image(48, 32)
    out = refiner(image=image, prompt="a cat", seed=3)
    assert isinstance(out, Image.Image) and out.size == (48, 32)
    assert out.tobytes() == refiner(image=image, prompt="a cat", seed=3).tobytes()
    assert out.tobytes() != refiner(image=image, prompt="a cat", seed=4).tobytes()

    resized = refiner(image=image, prompt="a cat", width=64, height=48, seed=3)
    assert resized.size == (64, 48)
    batch = refiner(image=[image, random_image(48, 32, 1)], prompt=["a cat", "a dog"], seed=3, output_type="pt")
    assert isinstance(batch, HunyuanImageOutput) and batch.images.shape == (2, 3, 32, 48) and batch.seeds == [3, 4]
    assert torch.allclose(
        batch.images[:1], refiner(image=image, prompt="a cat", seed=3, output_type="pt").images, atol=1e-5
    )
    latents = refiner(image=image, prompt="a cat", seed=3, output_type="latent", num_inference_steps=2)
    assert latents.shape == (1, 6, 1, 2, 3)


@torch.no_grad()
def test_refiner_matches_diffusers_given_the_same_draws(refiner) -> None:
    """Condition (VAE sample, frame pairs, scaling, 25% augmentation) and the 4-step loop (shift 4, guidance
    3.25 x 1000 embedded) against diffusers' refiner fed the same random draws: the VAE-sample noise and the
    augmentation noise come, in that order, from a generator seeded with the seed; the initial noise from another
    one with the same seed (the official pipeline's global RNG and its seeded generator, on the CPU)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import HunyuanImageRefinerPipeline as DiffusersRefiner

    image = random_image(48, 32)
    ours = refiner(image=image, prompt="a cat", seed=3, guidance_scale=3.25, output_type="latent")

    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    dist = refiner.vae.encode((pixels * 2 - 1).unsqueeze(2)).latent_dist
    draws = torch.Generator().manual_seed(3)
    sample = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=draws)
    image_latents = DiffusersRefiner._reorder_image_tokens(sample) * refiner.vae.config.scaling_factor
    noise = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3))
    text, mask = FakeTextEncoder().encode(["a cat"])
    reference = DiffusersRefiner(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=4.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=diffusers_twin(refiner.dit),
    )
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        image=image_latents,
        latents=noise,
        generator=draws,
        prompt_embeds=text,
        prompt_embeds_mask=mask,
        height=32,
        width=48,
        num_inference_steps=4,
        distilled_guidance_scale=3.25,
        output_type="latent",
    ).images
    error = max_rel_error(ours, expected)
    assert error <= TOLERANCE, error


@torch.no_grad()
def test_condition_uses_vae_sample_and_augmentation_noise_of_the_seed(refiner) -> None:
    """Official: condition = 0.25 * noise + 0.75 * (scaling * frame-paired VAE sample); here both draws come from the seed."""
    pixels = torch.rand(1, 3, 32, 48)
    g = torch.Generator().manual_seed(3)
    condition = refiner._condition(pixels, [g])
    dist = refiner.vae.encode(pixels.mul(2).sub(1).unsqueeze(2)).latent_dist
    g = torch.Generator().manual_seed(3)
    sample = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
    paired = frames_to_channel_pairs(sample) * refiner.vae.config.scaling_factor
    expected = 0.25 * torch.randn(paired.shape, generator=g) + 0.75 * paired
    assert torch.allclose(condition, expected, atol=1e-6)


@torch.no_grad()
def test_base_then_refiner_and_float_handoff(refiner) -> None:
    """use_refiner=True hands the decoded image to the refiner (8-bit by default, as the official pipeline)."""
    base = make_pipe(tiny_model(TINY_CONFIGS["hunyuanimage-v2.1-distilled"]), tiny_vae(), refiner_pipeline=refiner)
    common = dict(prompt="a cat", width=64, height=96, num_inference_steps=2, seed=5, output_type="pt")
    via_uint8 = base(use_refiner=True, **common).images
    assert via_uint8.shape == (1, 3, 96, 64)
    stage_one = base(**common).images
    by_hand = refiner(
        image=Image.fromarray((stage_one[0].permute(1, 2, 0) * 255).byte().numpy()),
        prompt="a cat",
        seed=5,
        guidance_scale=3.25,
        output_type="pt",
    ).images
    assert torch.allclose(via_uint8, by_hand, atol=1e-6)
    via_float = base(use_refiner=True, refiner_handoff="float", **common).images
    assert via_float.shape == via_uint8.shape


def test_refiner_errors(refiner) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        refiner(image=random_image(40, 32), prompt="a cat")
    with pytest.raises(ValueError, match="`prompt` has 2 entries|one per prompt"):
        refiner(image=random_image(48, 32), prompt=["a", "b"])
    with pytest.raises(ValueError, match="without `prompt_embeds_mask`"):
        refiner(image=random_image(48, 32), prompt_embeds=torch.zeros(1, 4, 40))
    mismatched = HunyuanImageRefinerPipeline(
        dit=refiner.dit, vae=tiny_refiner_vae(latent_channels=4), text_encoder=FakeTextEncoder()
    )
    with pytest.raises(ValueError, match="vae/vae_refiner"):
        mismatched(image=random_image(48, 32), prompt="a cat")
