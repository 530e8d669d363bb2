"""Step caching (hyimage.cache) against diffusers' hooks on the same tiny random weights, and in the pipelines.

diffusers runs classifier-free guidance's two halves as two calls, each in its own cache context, so each half
decides alone; our pipeline runs [unconditional; conditional] as one batch whose samples decide alone, which
gives the same decisions: the CFG tests compare one batched call of ours with diffusers' two calls. A batch of
several prompts is where we differ by design (diffusers decides once per batch, we per image): that case is
checked against decisions worked out by hand from the inputs and against diffusers run per image.
"""

import pytest
import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_taylorseer_cache,
)

from hyimage.cache import CacheOptionError, cache_bytes, make_cache, parse_cache_spec
from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline
from hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline import HunyuanImageRefinerPipeline
from hyimage.models.vae.vae_2d import HunyuanVAE2D
from hyimage.offload.streaming import BlockStreamer
from tests.fixtures.diffusers_dit import diffusers_twin
from tests.fixtures.numerics import TOLERANCE, max_rel_error
from tests.fixtures.tiny_tree import TEXT_DIM, TINY_BASE, TINY_DISTILLED, random_dit
from tests.fixtures.vae_fixtures import tiny_vae_2d_config

CONFIGS = {"base": TINY_BASE, "distilled": TINY_DISTILLED}
THRESHOLD = 0.05
# Per step and sample: how far the latents move. 1e-3 with an unchanged timestep moves the first block's
# residual by about 1e-3 of its size (skip at 0.05), 0.3 or more by 0.1 or more (compute).
MOVES = [(0, 0), (1e-3, 0.5), (0.5, 1e-3), (2e-3, 2e-3), (1, 1), (1e-3, 0.3), (1e-3, 1e-3)]


def step_inputs(config: dict, samples: int, seed: int = 1) -> tuple[dict, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(samples, config["in_channels"], 4, 3, generator=g),
        text_states=torch.randn(samples, 9, TEXT_DIM, generator=g),
        encoder_attention_mask=(torch.arange(9) < torch.tensor([[5], [9]])[:samples]).long(),
        byt5_text_states=torch.randn(samples, 4, 1472, generator=g),
        byt5_text_mask=(torch.arange(4) < torch.tensor([[0], [3]])[:samples]).long(),
    )
    return inputs, g


def step_extras(config: dict, step: int, samples: int, timestep: float) -> dict:
    extras = {"timestep": torch.full((samples,), timestep)}
    if config.get("guidance_embed"):
        extras["guidance"] = torch.full((samples,), 3250.0)
    if config.get("use_meanflow"):
        extras["timesteps_r"] = torch.full((samples,), max(timestep - 100.0, 0.0))
    return extras


def run_twin(twin: torch.nn.Module, inputs: dict, rows: slice) -> torch.Tensor:
    return twin(
        hidden_states=inputs["hidden_states"][rows],
        timestep=inputs["timestep"][rows],
        encoder_hidden_states=inputs["text_states"][rows],
        encoder_attention_mask=inputs["encoder_attention_mask"][rows],
        encoder_hidden_states_2=inputs["byt5_text_states"][rows],
        encoder_attention_mask_2=inputs["byt5_text_mask"][rows],
        guidance=inputs["guidance"][rows] if "guidance" in inputs else None,
        timestep_r=inputs["timesteps_r"][rows] if "timesteps_r" in inputs else None,
        return_dict=False,
    )[0]


def fbc_state(twin: torch.nn.Module):
    """diffusers' per-context FBCache state (its `should_compute` is the last call's decision)."""
    hook = HookRegistry.check_if_exists_or_initialize(twin.transformer_blocks[0]).get_hook("fbc_leader_block_hook")
    return hook.state_manager._state_cache


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_fbcache_matches_diffusers(name: str) -> None:
    """Each step's decision per sample and the outputs equal diffusers' (one context per CFG half, as its
    pipeline runs them); the sequence holds skips and computes, and halves that decide differently."""
    config = CONFIGS[name]
    samples = 2 if name == "base" else 1  # the base model's [unconditional; conditional]
    contexts = ["uncond", "cond"][:samples]
    model = random_dit(config, 3)
    twin = diffusers_twin(model)
    apply_first_block_cache(twin, FirstBlockCacheConfig(threshold=THRESHOLD))
    cache = make_cache("fbcache", threshold=THRESHOLD)
    cache.reset()
    inputs, g = step_inputs(config, samples)
    theirs = []
    for step, moves in enumerate(MOVES):
        move = torch.tensor(moves[:samples])[:, None, None, None]
        inputs["hidden_states"] = (
            inputs["hidden_states"] + torch.randn(inputs["hidden_states"].shape, generator=g) * move
        )
        inputs.update(step_extras(config, step, samples, 900.0 if step < 4 else 850.0))
        ours = model(**inputs, block_cache=cache)
        reference = []
        for row, context in enumerate(contexts):
            with twin.cache_context(context):
                reference.append(run_twin(twin, inputs, slice(row, row + 1)))
        theirs.append([fbc_state(twin)[context].should_compute for context in contexts])
        assert cache.decisions[-1] == theirs[-1], f"step {step}"
        assert max_rel_error(ours, torch.cat(reference)) < TOLERANCE, f"step {step}"
    flat = [d for step in theirs for d in step]
    assert any(flat) and not all(flat)
    if samples == 2:
        assert any(u != c for u, c in theirs)


@torch.no_grad()
def test_fbcache_batch_of_prompts_decides_per_image() -> None:
    """By design unlike diffusers (one decision per batch): image 0 barely moves (hand-worked: ratio ~1e-3, skip),
    image 1 moves a lot (compute). Outputs are diffusers' run per image in its own context; diffusers' batched
    run computes both."""
    config = TINY_DISTILLED
    model = random_dit(config, 3)
    per_image, batched = diffusers_twin(model), diffusers_twin(model)
    for twin in (per_image, batched):
        apply_first_block_cache(twin, FirstBlockCacheConfig(threshold=THRESHOLD))
    cache = make_cache("fbcache", threshold=THRESHOLD)
    cache.reset()
    inputs, g = step_inputs(config, 2)
    inputs.update(step_extras(config, 0, 2, 900.0))
    for moves, expected in (((0, 0), [True, True]), ((1e-3, 1.0), [False, True])):
        move = torch.tensor(moves)[:, None, None, None]
        inputs["hidden_states"] = (
            inputs["hidden_states"] + torch.randn(inputs["hidden_states"].shape, generator=g) * move
        )
        ours = model(**inputs, block_cache=cache)
        reference = []
        for row in range(2):
            with per_image.cache_context(f"image{row}"):
                reference.append(run_twin(per_image, inputs, slice(row, row + 1)))
        with batched.cache_context("batch"):
            run_twin(batched, inputs, slice(None))
        assert cache.decisions[-1] == expected
        assert [fbc_state(per_image)[f"image{row}"].should_compute for row in range(2)] == expected
        assert max_rel_error(ours, torch.cat(reference)) < TOLERANCE
    assert fbc_state(batched)["batch"].should_compute  # one decision for both images


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_taylorseer_matches_diffusers(name: str) -> None:
    """Full steps and predictions equal diffusers' TaylorSeer (lite mode: the model output predicted)."""
    config = CONFIGS[name]
    samples = 2 if name == "base" else 1
    contexts = ["uncond", "cond"][:samples]
    model = random_dit(config, 3)
    twin = diffusers_twin(model)
    apply_taylorseer_cache(
        twin,
        TaylorSeerCacheConfig(
            cache_interval=4,
            disable_cache_before_step=3,
            max_order=2,
            taylor_factors_dtype=torch.float32,
            use_lite_mode=True,
        ),
    )
    calls = []
    twin.transformer_blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    cache = make_cache("taylorseer", interval=4, order=2, warmup=3)
    cache.reset()
    forward = cache.wrap(lambda dit, _dtype, *args, **kwargs: dit(*args, **kwargs))
    inputs, _ = step_inputs(config, samples)
    last_full = None
    predicted_moved = False
    for step in range(12):
        inputs.update(step_extras(config, step, samples, 1000.0 - 80 * step))
        ours = forward(model, None, **inputs)
        reference, full = [], []
        for row, context in enumerate(contexts):
            before = len(calls)
            with twin.cache_context(context):
                reference.append(run_twin(twin, inputs, slice(row, row + 1)))
            full.append(len(calls) > before)
        reference = torch.cat(reference)
        assert cache.decisions[-1] == full, f"step {step}"
        assert max_rel_error(ours, reference) < TOLERANCE, f"step {step}"
        if full[0]:
            last_full = reference
        else:
            predicted_moved |= max_rel_error(last_full, reference) > 100 * TOLERANCE
        inputs["hidden_states"] = inputs["hidden_states"] - 0.08 * reference
    assert [d[0] for d in cache.decisions] == [s in (0, 1, 2, 4, 8) for s in range(12)]
    assert predicted_moved  # the predictions are no copies of the last full output


def tiny_pipeline(config: dict) -> HunyuanImagePipeline:
    return HunyuanImagePipeline(
        dit=random_dit(config, 5), vae=HunyuanVAE2D(**tiny_vae_2d_config()).eval(), progress_bar=False
    )


def pipeline_inputs(steps: int, cfg: bool = True) -> dict:
    g = torch.Generator().manual_seed(11)
    inputs = dict(
        prompt_embeds=torch.randn(1, 9, TEXT_DIM, generator=g),
        prompt_embeds_mask=(torch.arange(9) < 6).long()[None],
        negative_prompt_embeds=torch.randn(1, 9, TEXT_DIM, generator=g),
        negative_prompt_embeds_mask=(torch.arange(9) < 4).long()[None],
        glyph_embeds=torch.zeros(1, 4, 1472),
        glyph_embeds_mask=torch.zeros(1, 4, dtype=torch.int64),
        negative_glyph_embeds=torch.zeros(1, 4, 1472),
        negative_glyph_embeds_mask=torch.zeros(1, 4, dtype=torch.int64),
        width=128,
        height=96,
        num_inference_steps=steps,
        seed=3,
        output_type="latent",
    )
    return inputs if cfg else {k: v for k, v in inputs.items() if not k.startswith("negative_")}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("kind, options", [("fbcache", {"threshold": 0.0}), ("taylorseer", {"interval": 1})])
def test_no_skipping_is_bit_identical(name: str, kind: str, options: dict) -> None:
    """threshold 0 and interval 1 compute every step: the same latents, bit for bit, as no cache."""
    pipe = tiny_pipeline(CONFIGS[name])
    inputs = pipeline_inputs(6, cfg=name == "base")
    plain = pipe(**inputs)
    assert pipe.cache_stats is None
    pipe.enable_cache(kind, **options)
    cached = pipe(**inputs)
    assert torch.equal(plain, cached)
    stats = pipe.cache_stats
    assert stats["steps"] == 6 and stats["full_steps"] == 6 and stats["cached_steps"] == 0
    assert stats["full_per_sample"] == [6, 6] if name == "base" else [6]
    pipe.disable_cache()
    assert torch.equal(pipe(**inputs), plain)


@pytest.mark.slow
def test_taylorseer_runs_a_third_of_50_steps() -> None:
    """interval 4, order 2 (warm-up 3 included): at most a third of the base model's 50 DiT evaluations."""
    pipe = tiny_pipeline(TINY_BASE)
    calls = []
    pipe.dit.register_forward_pre_hook(lambda *_: calls.append(1))
    pipe.enable_cache("taylorseer", interval=4, order=2)
    pipe(**pipeline_inputs(50))
    assert len(calls) == pipe.cache_stats["full_steps"] <= 50 / 3
    assert pipe.cache_stats["steps"] == 50


def test_fbcache_in_pipeline_resets_per_call() -> None:
    """A high threshold skips steps; each call starts empty, so the same call gives the same latents."""
    pipe = tiny_pipeline(TINY_BASE)
    pipe.enable_cache("fbcache", threshold=0.5)
    first = pipe(**pipeline_inputs(8))
    stats = pipe.cache_stats
    assert stats["cached_steps"] > 0 and stats["decisions"][0] == "FF"
    assert torch.equal(pipe(**pipeline_inputs(8)), first)
    assert pipe.cache_stats == stats


@torch.no_grad()
def test_skipped_blocks_are_not_streamed() -> None:
    """Under block streaming a skipped step loads the first block only (and the text refiner's, which run)."""
    config = TINY_DISTILLED
    model = random_dit(config, 3)
    streamer = BlockStreamer(model, torch.device("cpu"))
    streamer.attach()
    blocks = config["mm_double_blocks_depth"] + config["mm_single_blocks_depth"]
    cache = make_cache("fbcache", threshold=THRESHOLD)
    cache.reset()
    inputs, _ = step_inputs(config, 1)
    inputs.update(step_extras(config, 0, 1, 900.0))
    loads = []
    for _ in range(3):
        before = streamer.counts["load"]
        model(**inputs, block_cache=cache)
        loads.append(streamer.counts["load"] - before)
    streamer.detach()
    assert cache.decisions == [[True], [False], [False]]
    assert loads == [loads[0], loads[0] - blocks + 1, loads[0] - blocks + 1]


def test_options_are_checked() -> None:
    assert parse_cache_spec("taylorseer:interval=4,order=2") == ("taylorseer", {"interval": 4, "order": 2, "warmup": 3})
    assert parse_cache_spec("fbcache:threshold=0.08") == ("fbcache", {"threshold": 0.08})
    assert parse_cache_spec("fbcache") == ("fbcache", {"threshold": 0.05})
    for spec, argument in (
        ("teacache", "cache"),
        ("fbcache:treshold=0.1", "treshold"),
        ("fbcache:threshold=-1", "threshold"),
        ("fbcache:threshold=abc", "threshold"),
        ("taylorseer:interval=2.5", "interval"),
        ("taylorseer:interval=0", "interval"),
        ("taylorseer:warmup=0", "warmup"),
        ("taylorseer:order", "cache"),
    ):
        with pytest.raises(CacheOptionError, match=argument) as raised:
            parse_cache_spec(spec)
        assert raised.value.argument == argument
    with pytest.raises(CacheOptionError, match="treshold"):
        make_cache("fbcache", treshold=0.1)


@torch.no_grad()
def test_cache_bytes_covers_what_the_caches_hold() -> None:
    """cache_bytes is at least the bytes of the tensors each cache keeps after a run of the tiny pipeline."""
    pipe = tiny_pipeline(TINY_BASE)
    hidden, image_tokens, text_tokens = TINY_BASE["hidden_size"], 4 * 3, 6 + 0
    for kind, options in (("fbcache", {"threshold": 0.5}), ("taylorseer", {"order": 2})):
        pipe.enable_cache(kind, **options)
        pipe(**pipeline_inputs(8))
        cache = pipe.step_cache
        held = cache.factors if kind == "taylorseer" else [cache.head_residual, cache.tail_residual]
        held_bytes = sum(t.numel() * t.element_size() for t in held)
        planned = cache_bytes(kind, options, 2, image_tokens, text_tokens, hidden, 4, token_features=64)
        assert held_bytes <= planned <= 4 * held_bytes
    assert cache_bytes(None, {}, 2, image_tokens, text_tokens, hidden, 4) == 0


def test_the_memory_plan_counts_an_enabled_cache_in_its_dit_stage() -> None:
    """In mode "auto", enable_cache plans again with the cache's tensors in the DiT stage (as much as cache_bytes
    says for the request's DiT and size), disable_cache drops them; the refiner pipeline counts its own cache in
    the refiner DiT's stage."""
    from hyimage.offload import MemoryManager
    from hyimage.offload.activations import dit_tokens
    from hyimage.offload.request import PlanRequest, dit_config

    request = PlanRequest(variant="hunyuanimage-v2.1", fp8=True)
    memory = MemoryManager("cpu", "auto", gpu_budget_gb=24, request=request)
    pipe = tiny_pipeline(TINY_BASE)
    pipe.memory = memory
    plain = memory.plan.stage("dit").activations_gib
    pipe.enable_cache("fbcache", threshold=0.08)
    assert memory.request.cache == ("fbcache", (("threshold", 0.08),))
    config = dit_config(request)
    held = cache_bytes("fbcache", {"threshold": 0.08}, 2, *dit_tokens(request), config.hidden_size, 2)
    assert abs((memory.plan.stage("dit").activations_gib - plain) * 1024**3 - held) < 1024
    pipe.disable_cache()
    assert memory.request.cache is None and memory.plan.stage("dit").activations_gib == plain
    assert HunyuanImageRefinerPipeline.DIT_STAGE == "refiner_dit"


@pytest.mark.parametrize("command", [["generate", "a fox"], ["batch", "prompts.jsonl", "--out", "out"], ["serve"]])
def test_cli_cache_option(command: list[str], capsys: pytest.CaptureFixture) -> None:
    """`--cache KIND[:k=v,...]` on generate, batch and serve; a wrong option is refused by name at parsing."""
    from hyimage.cli.console import build_parser

    args = build_parser().parse_args([*command, "--cache", "taylorseer:interval=4,order=2"])
    assert args.cache == ("taylorseer", {"interval": 4, "order": 2, "warmup": 3})
    assert build_parser().parse_args(command).cache is None
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--cache", "fbcache:treshold=0.1"])
    assert "fbcache has no option 'treshold'" in capsys.readouterr().err
