"""HunyuanImagePipeline on tiny parts: the loop against diffusers' pipeline, batching, seeds, outputs, errors.

The official loop (HunyuanImage-2.1 `HunyuanImagePipeline.__call__`) was also run next to this one on the same
tiny weights outside the suite (it needs the official repository); the suite's oracle is diffusers where it
follows the official behaviour.

Where diffusers deviates from the official pipeline, the official behaviour is tested:
- diffusers picks ONE guider for the whole batch (the OCR guider if any sample has glyph text); the official
  pipeline decides per prompt. Here each sample is compared with diffusers run on that sample alone.
- diffusers also takes ASCII single quotes as glyph text; the official extraction does not (see test_glyph.py).
"""

import re
from dataclasses import replace

import pytest
import torch
from PIL import Image

from hyimage.diffusion.guidance import GuidanceConfig
from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImageOutput, resolve_size
from hyimage.models.vae.vae_2d import HunyuanVAE2D
from hyimage.offload import MemoryManager
from hyimage.variants import ASPECT_RATIOS
from tests.fixtures.diffusers_dit import diffusers_twin
from tests.fixtures.numerics import TOLERANCE, max_rel_error
from tests.fixtures.tiny_dit import TINY_CONFIGS, tiny_model
from tests.fixtures.tiny_pipeline import (
    BASE,
    DISTILLED,
    LATENT_CHANNELS,
    TEXT_DIM,
    FakeTextEncoder,
    fixed_inputs,
    make_pipe,
    tiny_vae,
)


@pytest.fixture(scope="module")
def base_dit() -> torch.nn.Module:
    return tiny_model(TINY_CONFIGS[BASE])


@pytest.fixture(scope="module")
def distilled_dit() -> torch.nn.Module:
    return tiny_model(TINY_CONFIGS[DISTILLED])


@pytest.fixture(scope="module")
def vae() -> HunyuanVAE2D:
    return tiny_vae()


def diffusers_pipeline(dit, shift: float, guider=None, ocr_guider=None):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import HunyuanImagePipeline as DiffusersPipeline

    pipe = DiffusersPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=diffusers_twin(dit),
        guider=guider,
        ocr_guider=ocr_guider,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(pipe, inputs: dict, index: slice, **kwargs) -> torch.Tensor:
    return pipe(
        prompt_embeds=inputs["prompt_embeds"][index],
        prompt_embeds_mask=inputs["prompt_embeds_mask"][index],
        negative_prompt_embeds=inputs["negative_prompt_embeds"][index],
        negative_prompt_embeds_mask=inputs["negative_prompt_embeds_mask"][index],
        prompt_embeds_2=inputs["glyph_embeds"][index],
        prompt_embeds_mask_2=inputs["glyph_embeds_mask"][index],
        negative_prompt_embeds_2=inputs["negative_glyph_embeds"][index],
        negative_prompt_embeds_mask_2=inputs["negative_glyph_embeds_mask"][index],
        latents=inputs["latents"][index],
        output_type="latent",
        **kwargs,
    ).images


@torch.no_grad()
def test_base_loop_matches_diffusers_per_sample(base_dit, vae) -> None:
    """Base model, 8 steps, MIX_mode_0: the general sample switches CFG -> APG after step 5, the OCR sample
    (switch after step 38) stays on CFG. Ours runs both in one batch; diffusers runs each alone, because it
    would pick the OCR guider for the whole mixed batch (checked below to differ)."""
    from diffusers.guiders import AdaptiveProjectedMixGuidance

    inputs = fixed_inputs()
    ours = make_pipe(base_dit, vae)(**inputs, num_inference_steps=8, guidance_scale=3.5, shift=5, output_type="latent")
    guider = AdaptiveProjectedMixGuidance(guidance_scale=3.5, adaptive_projected_guidance_start_step=5)
    ocr_guider = AdaptiveProjectedMixGuidance(guidance_scale=3.5, adaptive_projected_guidance_start_step=38)
    reference = diffusers_pipeline(base_dit, 5, guider, ocr_guider)
    for i in range(2):
        ref = run_diffusers(reference, inputs, slice(i, i + 1), num_inference_steps=8)
        assert max_rel_error(ours[i : i + 1], ref) <= TOLERANCE, f"sample {i}"

    whole_batch = run_diffusers(reference, inputs, slice(0, 2), num_inference_steps=8)
    assert max_rel_error(ours[:1], whole_batch[:1]) > 1e-3, "diffusers' single guider should change the general sample"


@torch.no_grad()
def test_distilled_meanflow_loop_matches_diffusers(distilled_dit, vae) -> None:
    """Distilled model: no CFG, guidance 3.25 x 1000 embedded, MeanFlow timesteps_r, shift 4, both samples in one batch."""
    inputs = fixed_inputs()
    ours = make_pipe(distilled_dit, vae)(
        **inputs, num_inference_steps=8, guidance_scale=3.25, shift=4, output_type="latent"
    )
    ref = run_diffusers(
        diffusers_pipeline(distilled_dit, 4), inputs, slice(0, 2), num_inference_steps=8, distilled_guidance_scale=3.25
    )
    assert max_rel_error(ours, ref) <= TOLERANCE


@torch.no_grad()
def test_mixed_batch_equals_one_at_a_time(base_dit, vae) -> None:
    """A prompt with quoted text and one without, batched, equal the same prompts run alone, image by image."""
    pipe = make_pipe(base_dit, vae)
    prompts = ["a red apple on a table", 'a shop sign saying "OPEN"']
    common = dict(width=64, height=96, num_inference_steps=8, output_type="latent")
    batched = pipe(prompts, seed=[11, 12], **common)
    for i, (p, s) in enumerate(zip(prompts, (11, 12))):
        alone = pipe(p, seed=s, **common)
        assert max_rel_error(batched[i : i + 1], alone) <= TOLERANCE, p


@torch.no_grad()
def test_same_seed_same_image_and_output_types(distilled_dit, vae) -> None:
    pipe = make_pipe(distilled_dit, vae)
    common = dict(width=64, height=96, num_inference_steps=2)
    first = pipe("a cat", seed=5, **common)
    assert isinstance(first, Image.Image) and first.size == (64, 96)
    assert first.tobytes() == pipe("a cat", seed=5, **common).tobytes()
    assert first.tobytes() != pipe("a cat", seed=6, **common).tobytes()

    result = pipe(["a cat", "a dog"], seed=5, output_type="np", **common)
    assert isinstance(result, HunyuanImageOutput)
    assert result.images.shape == (2, 96, 64, 3) and result.seeds == [5, 6] and result.prompts == ["a cat", "a dog"]
    assert 0.0 <= result.images.min() and result.images.max() <= 1.0
    # image 2 of a batch with seed 5 is the image of seed 6 alone
    alone = pipe("a dog", seed=6, output_type="np", **common).images
    assert abs(result.images[1] - alone[0]).max() <= 1e-5

    many = pipe(
        "a cat",
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(5)] * 1 + [torch.Generator().manual_seed(9)],
        output_type="pt",
        **common,
    )
    assert many.images.shape == (2, 3, 96, 64) and many.seeds == [None, None]
    latents = pipe("a cat", seed=5, output_type="latent", **common)
    assert latents.shape == (1, LATENT_CHANNELS, 3, 2)


def test_noise_is_the_official_per_seed_draw(distilled_dit, vae) -> None:
    """The official pipeline draws torch.randn(latent shape, generator=Generator('cpu').manual_seed(seed))."""
    seen = []
    pipe = make_pipe(distilled_dit, vae)
    pipe(
        "a cat",
        "",
        width=64,
        height=96,
        num_inference_steps=1,
        seed=[3],
        output_type="latent",
        callback=lambda i, t, x: seen.append(x),
    )
    noise = torch.randn((1, LATENT_CHANNELS, 3, 2), generator=torch.Generator("cpu").manual_seed(3))
    direct = make_pipe(distilled_dit, vae)("a cat", latents=noise, num_inference_steps=1, output_type="latent")
    assert torch.equal(seen[0], direct)


def test_defaults_follow_the_dit_and_explicit_arguments_win(base_dit, distilled_dit, vae) -> None:
    base = make_pipe(base_dit, vae).defaults
    assert (base.num_inference_steps, base.guidance_scale, base.shift) == (50, 3.5, 5)
    pipe = make_pipe(distilled_dit, vae)
    distilled = pipe.defaults
    assert (distilled.num_inference_steps, distilled.guidance_scale, distilled.shift) == (8, 3.25, 4)

    def timesteps(**kwargs) -> list[float]:
        seen: list[float] = []
        pipe("a cat", width=32, height=32, output_type="latent", callback=lambda i, t, x: seen.append(t), **kwargs)
        return seen

    default = timesteps()
    assert len(default) == 8 and default[0] == 1000.0
    assert default[1] == pytest.approx(1000 * 4 * 0.875 / (1 + 3 * 0.875), rel=1e-6)
    explicit = timesteps(shift=2, num_inference_steps=4)
    assert len(explicit) == 4 and explicit[1] == pytest.approx(1000 * 2 * 0.75 / (1 + 0.75), rel=1e-6)


def test_parts_can_be_factories_built_once_on_first_use(distilled_dit, vae) -> None:
    built = []

    def make_dit():
        built.append("dit")
        return distilled_dit

    pipe = make_pipe(make_dit, lambda: vae)
    assert built == []
    for _ in range(2):
        pipe("a cat", width=32, height=32, num_inference_steps=1, output_type="latent")
    assert built == ["dit"]


def test_each_stage_runs_its_part_through_the_memory_manager(distilled_dit, vae) -> None:
    class Recording(MemoryManager):
        def __init__(self) -> None:
            super().__init__()
            self.parts: list[str] = []

        def running(self, module):
            self.parts.append(type(module).__name__)
            return super().running(module)

    memory = Recording()
    text_encoder = FakeTextEncoder()
    text_encoder.to = lambda device: text_encoder
    pipe = make_pipe(distilled_dit, vae, memory=memory, text_encoder=text_encoder)
    pipe.to("cpu")
    pipe('a sign "hi"', width=64, height=64, num_inference_steps=1)
    assert memory.parts == ["FakeTextEncoder", "HYImageDiffusionTransformer", "HunyuanVAE2D"]


def test_reprompt_rewrites_the_prompt_used(distilled_dit, vae) -> None:
    class Reprompt:
        def rewrite(self, prompt: str) -> str:
            return prompt + ", detailed"

    text_encoder = FakeTextEncoder()
    pipe = make_pipe(distilled_dit, vae, text_encoder=text_encoder, reprompt_model=Reprompt())
    result = pipe(["a cat", "a dog"], width=32, height=32, num_inference_steps=1, use_reprompt=True, seed=1)
    assert result.prompts == ["a cat, detailed", "a dog, detailed"]
    assert text_encoder.calls[0] == ["a cat, detailed", "a dog, detailed"]


def test_aspect_ratio_presets() -> None:
    readme = {"16:9": (2560, 1536), "4:3": (2304, 1792), "1:1": (2048, 2048), "3:4": (1792, 2304), "9:16": (1536, 2560)}
    for name, size in readme.items():
        assert resolve_size(None, None, name, 32) == size
    assert resolve_size(None, None, "3:2", 32) == (2496, 1664)
    assert resolve_size(None, None, "2:3", 32) == (1664, 2496)
    for w, h in ASPECT_RATIOS.values():
        assert w % 32 == 0 and h % 32 == 0
    assert resolve_size(None, None, None, 32) == (2048, 2048)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=48, height=64), "multiple of 32"),
        (dict(width=16, height=64), "multiple of 32"),
        (dict(width=64, height=0), "multiple of 32"),
        (dict(aspect_ratio="5:4", width=None, height=None), "`aspect_ratio` '5:4' is unknown"),
        (dict(aspect_ratio="1:1", height=None), "were both given"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "`negative_prompt` has 3 entries"),
        (dict(prompt=["a", "b"], seed=[1, 2, 3]), "one seed per image"),
        (dict(prompt=["a", "b"], generator=[torch.Generator()]), "one generator per image"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 4, TEXT_DIM)), "without `prompt_embeds_mask`"),
        (dict(negative_prompt_embeds=torch.zeros(1, 4, TEXT_DIM)), "without `negative_prompt_embeds_mask`"),
        (dict(glyph_embeds=torch.zeros(1, 4, 1472)), "without `glyph_embeds_mask`"),
        (dict(negative_glyph_embeds=torch.zeros(1, 4, 1472)), "without `negative_glyph_embeds_mask`"),
        (
            dict(prompt=["a", "b"], prompt_embeds=torch.zeros(3, 4, TEXT_DIM), prompt_embeds_mask=torch.ones(3, 4)),
            "`prompt` has 2",
        ),
        (dict(output_type="jpeg"), "output_type"),
        (dict(latents=torch.zeros(1, LATENT_CHANNELS + 1, 2, 2)), "`latents` must be"),
        (dict(use_refiner=True), "refiner_pipeline"),
        (dict(use_reprompt=True), "reprompt_model"),
        (
            dict(
                prompt=None,
                prompt_embeds=torch.zeros(1, 4, TEXT_DIM),
                prompt_embeds_mask=torch.ones(1, 4),
                use_refiner=True,
            ),
            "needs `prompt` text",
        ),
    ],
)
def test_bad_input_is_named(distilled_dit, vae, kwargs, message) -> None:
    kwargs = {"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        make_pipe(distilled_dit, vae)(**kwargs)


def test_dit_and_vae_channels_must_agree(distilled_dit) -> None:
    pipe = make_pipe(distilled_dit, tiny_vae(latent_channels=16))
    with pytest.raises(ValueError, match="latent channels but the VAE has 16"):
        pipe("a cat", width=64, height=64)


def test_unknown_guidance_mode_is_named() -> None:
    with pytest.raises(ValueError, match="guidance mode 'MIX_mode_9' is unknown"):
        GuidanceConfig(mode="MIX_mode_9")


def test_plain_cfg_mode_is_cfg_at_every_step(base_dit, vae) -> None:
    """mode "cfg": both samples take CFG throughout, so both equal diffusers' CFG-only guider (APG start beyond the last step)."""
    from diffusers.guiders import AdaptiveProjectedMixGuidance

    inputs = fixed_inputs()
    pipe = make_pipe(base_dit, vae, guidance=replace(GuidanceConfig(), mode="cfg"))
    ours = pipe(**inputs, num_inference_steps=3, guidance_scale=3.5, shift=5, output_type="latent")
    cfg_only = AdaptiveProjectedMixGuidance(guidance_scale=3.5, adaptive_projected_guidance_start_step=100)
    ref = run_diffusers(diffusers_pipeline(base_dit, 5, cfg_only, cfg_only), inputs, slice(0, 2), num_inference_steps=3)
    assert max_rel_error(ours, ref) <= TOLERANCE


def test_ascii_single_quotes_are_not_glyph_text(tmp_path) -> None:
    """Official: only "..." and the Chinese quotes mark text to render; diffusers also takes '...' (a deviation).
    With the real glyph encoder a single-quoted prompt has no valid glyph token, so MIX_mode_0 treats it as general."""
    from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text

    from hyimage.diffusion.guidance import Guidance
    from hyimage.text_encoders.glyph import GlyphByT5Encoder
    from tests.fixtures.glyph_fixtures import write_glyph_release

    write_glyph_release(tmp_path)
    encoder = GlyphByT5Encoder.from_pretrained(tmp_path / "byt5-small", tmp_path / "Glyph-SDXL-v2")
    prompts = ["a shop sign saying 'OPEN'", 'a shop sign saying "OPEN"']
    _, mask = encoder.encode(prompts)
    ocr = mask.bool().any(dim=1)
    assert ocr.tolist() == [False, True]
    assert extract_glyph_text(prompts[0]) is not None  # diffusers would render it
    assert Guidance(GuidanceConfig(), 3.5, ocr).uses_apg(6).tolist() == [True, False]
