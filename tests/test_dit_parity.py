"""Tiny DiTs of all three variants against diffusers' HunyuanImageTransformer2DModel on the same weights.

Known differences of diffusers from the official model, avoided or checked against official facts here:
- diffusers has no default guidance (it crashes on None); the official forward uses 6016.0, so
  `guidance=None` is compared with diffusers given 6016.0 explicitly.
- diffusers' token refiner lets a padded first text token attend only to itself, the official code treats it
  as valid; the masks here start with a valid token, as the text encoders produce.
"""

from dataclasses import replace

import pytest
import torch

from hyimage.models import HYImageDiffusionTransformer
from tests.fixtures.diffusers_dit import diffusers_twin
from tests.fixtures.numerics import TOLERANCE, max_rel_error
from tests.fixtures.tiny_dit import TINY_CONFIGS, make_inputs, tiny_model


def run_diffusers(twin: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return twin(
        hidden_states=inputs["hidden_states"],
        timestep=inputs["timestep"],
        encoder_hidden_states=inputs["text_states"],
        encoder_attention_mask=inputs["encoder_attention_mask"],
        encoder_hidden_states_2=inputs.get("byt5_text_states"),
        encoder_attention_mask_2=inputs.get("byt5_text_mask"),
        guidance=inputs.get("guidance"),
        timestep_r=inputs.get("timesteps_r"),
        return_dict=False,
    )[0]


@pytest.mark.parametrize("name", TINY_CONFIGS)
@torch.no_grad()
def test_matches_diffusers(name: str) -> None:
    config = TINY_CONFIGS[name]
    model = tiny_model(config)
    twin = diffusers_twin(model)
    inputs = make_inputs(config)
    ours = model(**inputs)
    reference = run_diffusers(twin, inputs)
    assert ours.shape == inputs["hidden_states"].shape[:1] + (config.out_channels,) + inputs["hidden_states"].shape[2:]
    assert max_rel_error(ours, reference) <= TOLERANCE


@pytest.mark.parametrize("name", ["hunyuanimage-v2.1-distilled", "hunyuanimage-refiner"])
@torch.no_grad()
def test_default_guidance_is_official_6016(name: str) -> None:
    config = TINY_CONFIGS[name]
    model = tiny_model(config)
    inputs = make_inputs(config)
    inputs.pop("guidance")
    reference = run_diffusers(diffusers_twin(model), {**inputs, "guidance": torch.full((2,), 6016.0)})
    assert max_rel_error(model(**inputs), reference) <= TOLERANCE


@pytest.mark.parametrize("name, patch_size", [("hunyuanimage-v2.1", (2, 2)), ("hunyuanimage-refiner", (1, 2, 2))])
@torch.no_grad()
def test_larger_patches_match_diffusers(name: str, patch_size: tuple) -> None:
    config = replace(TINY_CONFIGS[name], patch_size=patch_size, in_channels=4, out_channels=4)
    model = tiny_model(config)
    inputs = make_inputs(config)
    assert max_rel_error(model(**inputs), run_diffusers(diffusers_twin(model), inputs)) <= TOLERANCE


@pytest.mark.parametrize("name", ["hunyuanimage-v2.1", "hunyuanimage-refiner"])
@torch.no_grad()
def test_padding_does_not_change_prediction(name: str) -> None:
    """More padded text/glyph tokens (with random content), or a batch of one, give the same prediction."""
    config = TINY_CONFIGS[name]
    model = tiny_model(config)
    inputs = make_inputs(config)
    expected = model(**inputs)

    padded = dict(inputs)
    extra, extra_glyph = 6, 4
    padded["text_states"] = torch.cat([inputs["text_states"], torch.randn(2, extra, config.text_states_dim)], dim=1)
    padded["encoder_attention_mask"] = torch.nn.functional.pad(inputs["encoder_attention_mask"], (0, extra))
    if config.glyph_byT5_v2:
        padded["byt5_text_states"] = torch.cat([inputs["byt5_text_states"], torch.randn(2, extra_glyph, 1472)], 1)
        padded["byt5_text_mask"] = torch.nn.functional.pad(inputs["byt5_text_mask"], (0, extra_glyph))
    assert max_rel_error(model(**padded), expected) <= TOLERANCE

    first = {key: value[:1] for key, value in inputs.items()}
    valid = int(inputs["encoder_attention_mask"][0].sum())
    first["text_states"] = first["text_states"][:, :valid]
    first["encoder_attention_mask"] = first["encoder_attention_mask"][:, :valid]
    assert max_rel_error(model(**first), expected[:1]) <= TOLERANCE


def test_glyph_model_requires_byt5_inputs() -> None:
    config = TINY_CONFIGS["hunyuanimage-v2.1"]
    model = HYImageDiffusionTransformer(**config.to_dict())
    inputs = make_inputs(config)
    inputs.pop("byt5_text_states")
    with pytest.raises(ValueError, match="byt5_text_states"):
        model(**inputs)


def test_glyph_tokens_reordered_valid_first() -> None:
    """The official order per sample: valid glyph, valid text, padded glyph, padded text tokens."""
    from hyimage.models.dit.model import reorder_tokens, valid_first_order

    # token ids as features: glyph tokens 10.., text tokens 20..
    tokens = torch.tensor([[10, 11, 12, 20, 21, 22, 23], [10, 11, 12, 20, 21, 22, 23]]).float().unsqueeze(-1)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1, 0], [0, 0, 0, 1, 1, 1, 0]]).bool()
    order = valid_first_order(mask)
    reordered, new_mask = reorder_tokens(tokens, order), torch.gather(mask, 1, order)
    assert reordered.squeeze(-1).tolist() == [[10, 11, 20, 22, 12, 21, 23], [20, 21, 22, 10, 11, 12, 23]]
    assert new_mask.tolist() == [[True] * 4 + [False] * 3, [True] * 3 + [False] * 4]
