"""The ByT5 glyph encoder: quote extraction as the official pipeline does it, the Glyph
vocabulary, the official checkpoint format, and parity with diffusers' glyph embedding."""

import json
import os
import types
from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer, T5EncoderModel

from hyimage.text_encoders.glyph import GlyphByT5Encoder, build_glyph_tokenizer, load_glyph_state_dict
from hyimage.text_encoders.glyph_prompt import extract_glyph_texts, format_glyph_prompt, glyph_prompt
from tests.fixtures.glyph_fixtures import (
    GLYPH_VOCAB,
    write_glyph_assets,
    write_glyph_release,
    write_tiny_byt5,
)
from tests.fixtures.numerics import TOLERANCE, max_rel_error

# Expected values were produced by running the official HunyuanImagePipeline._encode_glyph
# (HunyuanImage-2.1, with MultilingualPromptFormat) on each prompt and capturing the string it
# hands to the ByT5 tokenizer; None means the official code returned zero states and mask.
OFFICIAL_GLYPH_PROMPTS = [
    ('A sign that says "Hello World" on a wall', 'Text "Hello World". '),
    ('A poster with "SALE" and "50% OFF" in red', 'Text "SALE". Text "50% OFF". '),
    ("一张海报，上面写着“新年快乐”和‘福’字", 'Text "福". Text "新年快乐". '),
    ('Mixed: ‘b’ then "a" then “c” then "d"', 'Text "a". Text "d". Text "b". Text "c". '),
    ('Nested "outer “inner” text" here', 'Text "outer “inner” text". Text "inner". '),
    ('Nested curly “outer "inner" text” here', 'Text "inner". Text "outer "inner" text". '),
    ('Unbalanced "open quote only', None),
    ('Three quotes "a" b "c', 'Text "a". '),
    ("Unbalanced “open curly", None),
    ("It's a dog's life, 'single' quotes", None),
    ("Don't say 'hi' or \"bye\"", 'Text "bye". '),
    ('Empty "" quotes', 'Text "". '),
    ('Multi\nline "first\nsecond" text', None),
    ("", None),
    ("no quotes at all", None),
    ('“错配"混合”', 'Text "错配"混合". '),
]


@pytest.mark.parametrize("prompt, expected", OFFICIAL_GLYPH_PROMPTS)
def test_glyph_prompt_matches_official(prompt: str, expected: str | None) -> None:
    assert glyph_prompt(prompt) == expected


def test_extraction_order_and_formatting() -> None:
    texts = extract_glyph_texts('“c” ‘b’ "a" “d”')
    assert texts == ["a", "b", "c", "d"]  # by quote kind: ASCII double, Chinese single, Chinese double
    assert format_glyph_prompt(texts) == 'Text "a". Text "b". Text "c". Text "d". '
    assert format_glyph_prompt([]) == ""
    assert extract_glyph_texts("the cat's 'toy' isn't here") == []


def test_vocabulary_has_real_size(tmp_path: Path) -> None:
    write_tiny_byt5(tmp_path / "byt5")
    write_glyph_assets(tmp_path / "glyph")
    tokenizer = build_glyph_tokenizer(tmp_path / "byt5", tmp_path / "glyph")
    assert len(tokenizer) == 1510 == GLYPH_VOCAB
    fonts = list(json.loads((tmp_path / "glyph/assets/multilingual_10-lang_idx.json").read_text()).items())
    assert tokenizer.convert_tokens_to_ids(["<color-0>", "<color-137>"]) == [384, 521]
    first_font, last_font = (f"<{code[:2]}-font-{idx}>" for code, idx in (fonts[0], fonts[-1]))
    assert tokenizer.convert_tokens_to_ids([first_font, last_font]) == [522, 1509]
    ids = tokenizer('Text "A" in <color-5>. ').input_ids
    assert 389 in ids and len(ids) == len('Text "A" in . ') + 2  # one id for the colour token, plus </s>


def _diffusers_glyph_embeds(prompts: list[str], tokenizer: ByT5Tokenizer, encoder: T5EncoderModel):
    """diffusers' HunyuanImagePipeline.encode_prompt, glyph part (the Qwen part is skipped)."""
    from diffusers import HunyuanImagePipeline

    pipe = types.SimpleNamespace(
        tokenizer_2=tokenizer, text_encoder_2=encoder, tokenizer_2_max_length=128, _execution_device=torch.device("cpu")
    )
    pipe._get_byt5_prompt_embeds = types.MethodType(HunyuanImagePipeline._get_byt5_prompt_embeds, pipe)
    batch = len(prompts)
    with torch.no_grad():
        _, _, embeds, mask = HunyuanImagePipeline.encode_prompt(
            pipe, prompts, device=torch.device("cpu"), batch_size=batch,
            prompt_embeds=torch.zeros(batch, 1, 1), prompt_embeds_mask=torch.zeros(batch, 1),
        )
    return embeds, mask


def _diffusers_tokenizer(byt5_dir: Path, glyph_dir: Path) -> ByT5Tokenizer:
    """ByT5 tokenizer with the Glyph tokens added as the official byT5 loader does: colours, then fonts."""
    tokenizer = ByT5Tokenizer.from_pretrained(byt5_dir)
    colors = json.loads((glyph_dir / "assets/color_idx.json").read_text())
    fonts = json.loads((glyph_dir / "assets/multilingual_10-lang_idx.json").read_text())
    tokens = [f"<color-{i}>" for i in range(len(colors))] + [f"<{k[:2]}-font-{v}>" for k, v in fonts.items()]
    tokenizer.add_tokens(tokens, special_tokens=True)
    return tokenizer


# No ASCII single quotes: diffusers' extract_glyph_text also takes '...' as glyph text, the official code does not.
PARITY_PROMPTS = [
    'A red sign that says "OPEN 24 HOURS" above a door',
    "一张海报，上面写着“新年快乐”和‘福’字",
    "a cat on a sofa",
    'Poster: "' + "LONG TEXT " * 20 + '" and “more”',
]


def test_glyph_checkpoint_matches_diffusers(tmp_path: Path) -> None:
    reference = write_glyph_release(tmp_path)
    ours = GlyphByT5Encoder.from_pretrained(tmp_path / "byt5-small", tmp_path / "Glyph-SDXL-v2")
    embeds, mask = ours.encode(PARITY_PROMPTS)

    tokenizer = _diffusers_tokenizer(tmp_path / "byt5-small", tmp_path / "Glyph-SDXL-v2")
    ref_embeds, ref_mask = _diffusers_glyph_embeds(PARITY_PROMPTS, tokenizer, reference)

    assert embeds.shape == (4, 128, 32) and mask.dtype == torch.int64
    assert torch.equal(mask, ref_mask)
    assert mask.any(dim=1).tolist() == [True, True, False, True]
    assert mask[3].all()  # the long glyph prompt is cut to 128 tokens
    assert embeds[2].abs().max() == 0
    assert max_rel_error(embeds, ref_embeds) <= TOLERANCE


def test_diffusers_layout_loads(tmp_path: Path) -> None:
    reference = write_glyph_release(tmp_path / "official")
    diffusers_dir = tmp_path / "diffusers"
    reference.save_pretrained(diffusers_dir / "text_encoder_2")
    _diffusers_tokenizer(tmp_path / "official/byt5-small", tmp_path / "official/Glyph-SDXL-v2").save_pretrained(
        diffusers_dir / "tokenizer_2"
    )
    ours = GlyphByT5Encoder.from_diffusers(diffusers_dir)
    embeds, mask = ours.encode(PARITY_PROMPTS[:3])
    ref_embeds, ref_mask = _diffusers_glyph_embeds(PARITY_PROMPTS[:3], ours.tokenizer, reference)
    assert len(ours.tokenizer) == GLYPH_VOCAB
    assert torch.equal(mask, ref_mask)
    assert max_rel_error(embeds, ref_embeds) <= TOLERANCE


def test_diffusers_takes_ascii_single_quotes_as_glyph_text(tmp_path: Path) -> None:
    """A known deviation of diffusers from the official pipeline: we follow the official code."""
    from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text

    prompt = "a shop sign reading 'BAKERY'"
    assert extract_glyph_text(prompt) == 'Text "BAKERY". '
    assert glyph_prompt(prompt) is None


def test_checkpoint_state_dict_keys(tmp_path: Path) -> None:
    encoder = write_glyph_release(tmp_path)
    state = load_glyph_state_dict(tmp_path / "Glyph-SDXL-v2/checkpoints/byt5_model.pt")
    assert set(state) == set(encoder.state_dict())  # other modules of the training checkpoint are dropped
    assert torch.equal(state["encoder.block.1.layer.1.DenseReluDense.wo.weight"], encoder.encoder.block[1].layer[1].DenseReluDense.wo.weight)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_code_executing_checkpoint_is_refused(tmp_path: Path) -> None:
    write_glyph_release(tmp_path)
    checkpoint = tmp_path / "Glyph-SDXL-v2/checkpoints/byt5_model.pt"
    marker = tmp_path / "pwned"
    state = torch.load(checkpoint, weights_only=True)
    state["hook"] = _RunsCode(marker)
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="byt5_model.pt"):
        GlyphByT5Encoder.from_pretrained(tmp_path / "byt5-small", tmp_path / "Glyph-SDXL-v2")
    assert not marker.exists()


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    write_tiny_byt5(tmp_path / "byt5-small")
    with pytest.raises(FileNotFoundError, match="color_idx.json"):
        GlyphByT5Encoder.from_pretrained(tmp_path / "byt5-small", tmp_path / "Glyph-SDXL-v2")
    write_glyph_assets(tmp_path / "Glyph-SDXL-v2")
    with pytest.raises(FileNotFoundError, match="byt5_model.pt"):
        GlyphByT5Encoder.from_pretrained(tmp_path / "byt5-small", tmp_path / "Glyph-SDXL-v2")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GlyphByT5Encoder.from_pretrained(tmp_path / "nowhere", tmp_path / "Glyph-SDXL-v2")


@pytest.mark.skipif(not os.environ.get("HYIMAGE_CKPTS"), reason="set HYIMAGE_CKPTS to a ckpts/ folder to run")
def test_released_glyph_encoder_loads() -> None:
    text_encoder_dir = Path(os.environ["HYIMAGE_CKPTS"]) / "text_encoder"
    encoder = GlyphByT5Encoder.from_pretrained(text_encoder_dir / "byt5-small", text_encoder_dir / "Glyph-SDXL-v2")
    assert len(encoder.tokenizer) == 1510
    embeds, mask = encoder.encode(['A sign that says "Hello"', "no text"])
    assert embeds.shape == (2, 128, 1472) and mask.any(dim=1).tolist() == [True, False]
    assert embeds.isfinite().all()
