"""Speed work that must not change results: padding trimmed before the DiT, and a denoising loop that never
reads a value back from the device after its first step."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hyimage.diffusion.padding import trim_padding, trimmed_length
from hyimage.diffusion.pipelines import denoise
from tests.fixtures.tiny_dit import TINY_CONFIGS, tiny_model
from tests.fixtures.tiny_pipeline import BASE, LATENT_CHANNELS, TEXT_DIM, make_pipe, tiny_vae


def lengths_mask(lengths: list[int], length: int) -> torch.Tensor:
    return (torch.arange(length) < torch.tensor(lengths)[:, None]).long()


def uneven_inputs(text_lengths: list[int], glyph_lengths: list[int], text_len: int = 64, glyph_len: int = 14) -> dict:
    """Prompts of very different lengths in one batch, padded far beyond the longest, with random padding."""
    g = torch.Generator().manual_seed(3)
    n = len(text_lengths)
    glyph_mask = lengths_mask(glyph_lengths, glyph_len)
    return dict(
        prompt_embeds=torch.randn(n, text_len, TEXT_DIM, generator=g),
        prompt_embeds_mask=lengths_mask(text_lengths, text_len),
        negative_prompt_embeds=torch.randn(n, text_len, TEXT_DIM, generator=g),
        negative_prompt_embeds_mask=lengths_mask([2] * n, text_len),
        glyph_embeds=torch.randn(n, glyph_len, 1472, generator=g),
        glyph_embeds_mask=glyph_mask,
        negative_glyph_embeds=torch.zeros(n, glyph_len, 1472),
        negative_glyph_embeds_mask=torch.zeros(n, glyph_len, dtype=torch.int64),
        latents=torch.randn(n, LATENT_CHANNELS, 3, 2, generator=g),
    )


@pytest.fixture(scope="module")
def base_pipe():
    return make_pipe(tiny_model(TINY_CONFIGS[BASE]), tiny_vae())


def test_trimmed_length_is_one_past_the_last_valid_position_of_any_sample() -> None:
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0]])
    assert trimmed_length(mask) == 4
    assert trimmed_length(torch.zeros(2, 6)) == 1
    states, cut = trim_padding(torch.randn(2, 6, 3), mask)
    assert states.shape == (2, 4, 3) and torch.equal(cut, mask[:, :4])


@pytest.mark.slow
@torch.no_grad()
def test_trimming_keeps_the_latents_of_uneven_prompts(base_pipe, monkeypatch) -> None:
    """Texts of 3, 17 and 50 valid tokens of 64 and glyphs of 0, 2 and 9 of 14 (MIX guidance, OCR and general
    samples in one batch): the same final latents with the padding cut as with all of it computed."""
    inputs = uneven_inputs([3, 17, 50], [0, 2, 9])
    trimmed = base_pipe(**inputs, num_inference_steps=7, output_type="latent")
    monkeypatch.setattr(denoise, "trim_padding", lambda states, mask: (states, mask))  # the loop's module
    full = base_pipe(**inputs, num_inference_steps=7, output_type="latent")
    print(f"max |trimmed - full| = {(trimmed - full).abs().max().item():.3g}")
    assert (trimmed - full).abs().max() <= 1e-6 * full.abs().max()


SYNCING_OPS = {
    "aten._local_scalar_dense",
    "aten.item",
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.masked_select",
    "aten.unique",
    "aten._unique2",
    "aten.repeat_interleave",
}


class SyncCounter(TorchDispatchMode):
    """Counts the operators that read a value back from the device (scalars, data-dependent shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
            if i is not None
        )
        if name in SYNCING_OPS or bool_index:
            self.counts[name] += 1
        return func(*args, **kwargs)


@pytest.mark.slow
@torch.no_grad()
def test_no_device_read_in_a_step_after_the_first(base_pipe) -> None:
    """A whole call to the latents (CFG then per-sample APG, glyph and plain prompts, callback): every operator that
    synchronises the host with the device is counted; none may run between the end of step 1 and the last step."""
    inputs = uneven_inputs([3, 17, 50], [0, 2, 9])
    per_step: list[int] = []
    counter = SyncCounter()

    def callback(step: int, timestep: float, latents: torch.Tensor) -> None:
        assert isinstance(timestep, float)
        per_step.append(sum(counter.counts.values()))

    with counter:
        base_pipe(**inputs, num_inference_steps=7, output_type="latent", callback=callback)
    assert len(per_step) == 7
    after_first = [b - a for a, b in zip(per_step, per_step[1:])]
    assert after_first == [0] * 6, dict(counter.counts)
    assert per_step[0] > 0  # the counter does see the one-off reads of the first step


@pytest.mark.slow
@torch.no_grad()
def test_compiled_blocks_equal_eager_without_graph_breaks() -> None:
    """Regional compile (dynamo with the aot_eager backend, so the test does not wait for C++ code generation;
    inductor gave the same output within 3e-7 outside the suite): one full graph per kind of block, shared by
    the three single-stream blocks, no graph break, and the eager output."""
    from dataclasses import replace

    from torch._dynamo.utils import counters

    from tests.fixtures.tiny_dit import make_inputs

    torch._dynamo.reset()
    counters.clear()
    config = replace(TINY_CONFIGS[BASE], mm_single_blocks_depth=3)
    model = tiny_model(config)
    inputs = make_inputs(config)
    eager = model(**inputs)
    compiled = model.compile_blocks(backend="aot_eager")(**inputs)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2
    assert (compiled - eager).abs().max() <= 1e-6 * eager.abs().max()
    torch._dynamo.reset()
