"""Reprompt: official chat layout, greedy generation, answer parsing and fallback, on tiny random
models with Qwen2.5's real tokenizer; each model's output is scripted through
`generate(prefix_allowed_tokens_fn=...)`, so the parsing sees a chosen text."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hyimage.offload.manager import MemoryManager
from hyimage.reprompt import Reprompter, normalize_quotes
from hyimage.reprompt.prompts import SYSTEM_PROMPT_7B, SYSTEM_PROMPT_32B
from tests.fixtures.qwen_tokenizer import copy_qwen_tokenizer

IM_END = 151645
VOCAB = 151680
TEXT = {"hidden_size": 16, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}


def _save(model: torch.nn.Module, directory: Path, tokenizer_dir: Path) -> Path:
    model.generation_config = GenerationConfig(eos_token_id=IM_END, pad_token_id=151643)
    model.save_pretrained(directory)
    copy_qwen_tokenizer(tokenizer_dir, directory)
    return directory


@pytest.fixture(scope="module")
def model_7b_dir(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_dir: Path) -> Path:  # noqa: F811
    """A tiny causal LM loaded through AutoModelForCausalLM, as the 7B is."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, eos_token_id=IM_END, tie_word_embeddings=True, **TEXT)
    return _save(Qwen2ForCausalLM(config), tmp_path_factory.mktemp("reprompt_7b"), qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def model_32b_dir(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_dir: Path) -> Path:  # noqa: F811
    """A tiny Qwen2.5-VL, the architecture of PromptEnhancer-32B."""
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": VOCAB, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, **TEXT},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16},
    )
    return _save(Qwen2_5_VLForConditionalGeneration(config), tmp_path_factory.mktemp("reprompt_32b"), qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def reprompter_7b(model_7b_dir: Path) -> Reprompter:
    return Reprompter.from_pretrained(model_7b_dir, size="7b", dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def reprompter_32b(model_32b_dir: Path) -> Reprompter:
    return Reprompter.from_pretrained(model_32b_dir, size="32b", dtype=torch.float32, device="cpu")


def _script(reprompter: Reprompter, text: str, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Make the model's greedy output be `text` then <|im_end|>; returns the recorded generate() calls."""
    target = reprompter.tokenizer(text, add_special_tokens=False).input_ids + [IM_END]
    prompt_length: dict[int, int] = {}

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        step = input_ids.shape[-1] - prompt_length.setdefault(batch_id, input_ids.shape[-1])
        return [target[min(step, len(target) - 1)]]

    calls: list[dict] = []
    real_generate = reprompter.model.generate

    def recording_generate(*args, **kwargs):
        calls.append({"args": args, **kwargs})
        return real_generate(*args, prefix_allowed_tokens_fn=allowed, **kwargs)

    monkeypatch.setattr(reprompter.model, "generate", recording_generate)
    return calls


def test_7b_parses_the_answer(reprompter_7b: Reprompter, monkeypatch: pytest.MonkeyPatch) -> None:
    reprompter = reprompter_7b
    calls = _script(reprompter, "<think>\n\n</think>\n<answer>\n A shop sign reading 'OPEN' and ‘营业中’. </answer> trailing", monkeypatch)
    assert reprompter.rewrite("a shop sign") == 'A shop sign reading "OPEN" and “营业中”.'

    # transformers 5: apply_chat_template(tokenize=True) gives a dict; it must reach generate as tensors
    (call,) = calls
    assert call["args"] == () and isinstance(call["input_ids"], torch.Tensor)
    assert call["attention_mask"].shape == call["input_ids"].shape and call["do_sample"] is False
    chat = reprompter.tokenizer.decode(call["input_ids"][0])
    assert chat.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT_7B}<|im_end|>\n<|im_start|>user\na shop sign<|im_end|>\n")
    assert chat.endswith("<|im_start|>assistant\n")


def test_official_7b_call_breaks_on_transformers_5(model_7b_dir: Path) -> None:
    """What the official 7B code does: pass apply_chat_template's output to generate positionally."""
    tokenizer = AutoTokenizer.from_pretrained(model_7b_dir)
    model = Qwen2ForCausalLM.from_pretrained(model_7b_dir)
    messages = [{"role": "system", "content": SYSTEM_PROMPT_7B}, {"role": "user", "content": "a cat"}]
    tokenized_chat = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_tensors="pt")
    if isinstance(tokenized_chat, torch.Tensor):
        pytest.skip("this transformers returns a tensor (4.x behaviour)")
    with pytest.raises((AttributeError, TypeError, ValueError)):
        model.generate(tokenized_chat, max_new_tokens=2)


def test_32b_parses_the_answer(reprompter_32b: Reprompter, monkeypatch: pytest.MonkeyPatch) -> None:
    reprompter = reprompter_32b
    calls = _script(reprompter, "<think>\nThe user wants a poster.\n</think>\nA poster with 'SALE' in ‘red’.\n", monkeypatch)
    assert reprompter.rewrite("a poster") == 'A poster with "SALE" in “red”.\n'
    (call,) = calls
    chat = reprompter.tokenizer.decode(call["input_ids"][0])
    assert chat == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{SYSTEM_PROMPT_32B}\na poster<|im_end|>\n<|im_start|>assistant\n"
    )
    assert reprompter.decoder_layers is reprompter.model.model.language_model.layers


@pytest.mark.parametrize(
    "size, output",
    [
        ("7b", "Sorry, no tags here."),
        ("7b", "<answer>   </answer>"),
        ("32b", "no think tags"),
        ("32b", "<think>a</think><think>b</think>text"),
    ],
)
def test_unusable_output_falls_back(
    size: str, output: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, warnings_logged: list[str]
) -> None:
    reprompter = request.getfixturevalue(f"reprompter_{size}")
    _script(reprompter, output, monkeypatch)
    assert reprompter.rewrite_batch(["keep 'me'", "and me"]) == ["keep 'me'", "and me"]
    assert len(warnings_logged) == 2 and all("using the prompt as given" in m for m in warnings_logged)


def test_remote_tokenizer_code_needs_opt_in(model_7b_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "reprompt"
    folder.mkdir()
    for file in model_7b_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_hy.HYTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        Reprompter.from_pretrained(folder, size="7b")


def test_weights_missing_from_the_folder_are_refused(model_7b_dir: Path, tmp_path: Path) -> None:
    """transformers would leave them random with a warning: a silently wrong rewrite."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    folder.mkdir()
    for path in model_7b_dir.iterdir():
        (folder / path.name).symlink_to(path)
    state = load_file(model_7b_dir / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    (folder / "model.safetensors").unlink()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"partial does not hold 1 weights .*model\.layers\.1\.mlp\.up_proj\.weight"):
        Reprompter.from_pretrained(folder, size="7b", dtype=torch.float32)


def test_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="PromptEnhancer-32B"):
        Reprompter.from_pretrained(tmp_path, size="32b")
    with pytest.raises(ValueError, match="size"):
        Reprompter.from_pretrained(tmp_path, size="13b")


def test_quote_normalisation_matches_official() -> None:
    # Expected values: the official replace_single_quotes (hyimage/models/reprompt/reprompt.py) on the same input.
    assert normalize_quotes("It's Tom's 'hat'") == 'It\'s Tom\'s "hat"'
    assert normalize_quotes("say 'hi' and ‘bye’") == 'say "hi" and “bye”'
    assert normalize_quotes("'start' of line") == '"start" of line'
    assert normalize_quotes("x'y'z") == "x'y'z"
    assert normalize_quotes("(‘a’) 'b'.") == '(“a”) "b".'


@pytest.mark.skipif(not os.environ.get("HYIMAGE_CKPTS"), reason="set HYIMAGE_CKPTS to a ckpts/ folder to run")
def test_released_32b_rewrites() -> None:
    path = Path(os.environ["HYIMAGE_CKPTS"]) / "reprompt_32b"
    if not path.is_dir():
        pytest.skip(f"{path} is not there")
    reprompter = Reprompter.from_pretrained(path, size="32b", max_new_tokens=512)
    assert reprompter.rewrite("一只猫") != "一只猫"


def test_32b_runs_under_block_streaming(reprompter_32b: Reprompter, monkeypatch: pytest.MonkeyPatch) -> None:
    """The offload streamer finds the decoder layers and generation still gives the scripted answer."""
    memory = MemoryManager("cpu", mode="block", gpu_budget_gb=1e-6)
    reprompter = Reprompter(reprompter_32b.model, reprompter_32b.tokenizer, "32b", memory=memory)
    streamer = memory.streamer(reprompter.model)
    assert any(name.startswith("model.language_model.layers.") for name in streamer.plan.streamed)
    _script(reprompter, "<think>x</think>\nA cat.", monkeypatch)
    assert reprompter.rewrite("a cat") == "A cat."
