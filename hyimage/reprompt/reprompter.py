"""Prompt rewriting with PromptEnhancer: the 32B (Qwen2.5-VL architecture) or the 7B (HunYuan dense).

Both decode greedily, read the answer as the official code does, normalise the quotes, and give
the user's prompt back, with a logged warning, when anything fails. The model sits in host
memory and is on the execution device only while it generates (`MemoryManager.running`); in
memory mode "block" its decoder layers are streamed from host memory, so the 32B (about 65 GB in
bf16) runs with `gpu_budget_gb` of resident weights.

Released layouts: `reprompt_32b` is a Qwen2.5-VL-32B folder (the official `reprompt_32b.py` loads it with
`Qwen2_5_VLForConditionalGeneration` and `AutoProcessor`, no remote code). `reprompt` (7B) is, by the
PromptEnhancer README, a Hunyuan-7B-Instruct derivative (`hunyuan_v1_dense`, native in transformers >= 4.56) whose
tokenizer is custom code (`auto_map`); its real config was not seen, so weights a folder lacks are refused
instead of left random, as transformers would with only a warning.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2_5_VLForConditionalGeneration,
)

from hyimage.errors import CheckpointError
from hyimage.loading.torch_io import transformers_errors
from hyimage.loading.verify import check_state_finite
from hyimage.offload.manager import MemoryManager
from hyimage.reprompt.prompts import SYSTEM_PROMPT_7B, extract_answer_7b, extract_answer_32b, user_message_32b
from hyimage.stages import REPROMPT

MAX_NEW_TOKENS = 2048


@dataclass(frozen=True)
class RepromptModelSpec:
    """How one PromptEnhancer model is asked and read."""

    download: str
    messages: Callable[[str], list[dict]]
    extract_answer: Callable[[str], str]
    skip_special_tokens: bool
    tokenize_in_template: bool
    """True: `apply_chat_template(tokenize=True)` (7B official); False: render, then tokenize (32B official)."""


SPECS = {
    "32b": RepromptModelSpec(
        download="hf download PromptEnhancer/PromptEnhancer-32B --local-dir ./ckpts/reprompt_32b",
        messages=lambda prompt: [{"role": "user", "content": [{"type": "text", "text": user_message_32b(prompt)}]}],
        extract_answer=extract_answer_32b,
        skip_special_tokens=True,
        tokenize_in_template=False,
    ),
    "7b": RepromptModelSpec(
        download="hf download tencent/HunyuanImage-2.1 --include 'reprompt/*' --local-dir ./ckpts",
        messages=lambda prompt: [{"role": "system", "content": SYSTEM_PROMPT_7B}, {"role": "user", "content": prompt}],
        extract_answer=extract_answer_7b,
        skip_special_tokens=False,
        tokenize_in_template=True,
    ),
}


class Reprompter(nn.Module):
    """A PromptEnhancer model and its tokenizer; `rewrite(prompt)` returns the enhanced prompt.

    `model` is the transformers causal LM; its decoder layers (`model.model.language_model.layers`
    for the 32B, `model.model.layers` for the 7B) are the block list the offload streamer finds.
    """

    memory_stage = REPROMPT

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        size: str = "32b",
        *,
        memory: MemoryManager | None = None,
        device: str | torch.device | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        chat_template: str | None = None,
    ):
        super().__init__()
        if size not in SPECS:
            raise ValueError(f"size={size!r} is unknown; choose one of {sorted(SPECS)}")
        if memory is None:
            device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
            memory = MemoryManager(device, mode="model")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.size = size
        self.spec = SPECS[size]
        self.memory = memory
        self.max_new_tokens = max_new_tokens
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        size: str = "32b",
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
        memory: MemoryManager | None = None,
        trust_remote_code: bool = False,
        max_new_tokens: int = MAX_NEW_TOKENS,
        verify: bool = False,
    ) -> "Reprompter":
        """Load `ckpts/reprompt_32b` (size "32b") or `ckpts/reprompt` (size "7b") into host memory.

        The 7B's tokenizer is custom code shipped with the checkpoint: it runs only when
        `trust_remote_code` is set to True, which the caller must do after deciding to trust that folder.
        The model itself always uses transformers' own implementation. `verify`: refuse NaN/Inf weights.
        """
        if size not in SPECS:
            raise ValueError(f"size={size!r} is unknown; choose one of {sorted(SPECS)}")
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path / 'config.json'} not found; download the {size} reprompt model with `{SPECS[size].download}`")
        remote = _remote_tokenizer_code(path)
        if remote and not trust_remote_code:
            raise ValueError(
                f"the tokenizer of {path} is code shipped in the checkpoint ({remote}); "
                "pass trust_remote_code=True (CLI: --trust-remote-code) to run it if you trust that folder"
            )
        with transformers_errors(path, f"{size} reprompt tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model_class = Qwen2_5_VLForConditionalGeneration if size == "32b" else AutoModelForCausalLM
        with transformers_errors(path, f"{size} reprompt model"):
            model, info = model_class.from_pretrained(
                path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=False, output_loading_info=True
            )
        _refuse_missing_weights(path, model_class.__name__, info["missing_keys"])
        if verify:
            check_state_finite(model.named_parameters(), path)
        return cls(
            model,
            tokenizer,
            size,
            memory=memory,
            device=device,
            max_new_tokens=max_new_tokens,
            chat_template=_processor_chat_template(path) if size == "32b" else None,
        )

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The language model's decoder layers (the blocks to stream)."""
        inner = self.model.model
        return getattr(inner, "language_model", inner).layers

    def rewrite(self, prompt: str) -> str:
        """The enhanced prompt, or `prompt` itself (with a warning) when the model gives no usable answer."""
        return self.rewrite_batch([prompt])[0]

    def rewrite_batch(self, prompts: list[str]) -> list[str]:
        """`rewrite` for each prompt, one after the other, with the model placed on the device once."""
        with self.memory.running(self.model, REPROMPT):
            return [self._rewrite_one(prompt) for prompt in prompts]

    @torch.inference_mode()
    def _rewrite_one(self, prompt: str) -> str:
        try:
            generated = self._generate(prompt)
            answer = self.spec.extract_answer(generated)
        except Exception as error:  # noqa: BLE001 (the official code falls back on any failure; so do we, with a warning)
            logger.warning(f"reprompt ({self.size}) failed, using the prompt as given: {type(error).__name__}: {error}")
            return prompt
        logger.info(f"reprompt ({self.size}): {answer}")
        return answer

    def _generate(self, prompt: str) -> str:
        """Greedy continuation of the chat for `prompt`, decoded (prompt tokens excluded)."""
        inputs = self._chat_inputs(prompt)
        device = self.memory.device
        input_ids = inputs["input_ids"].to(device)
        attention_mask = inputs["attention_mask"].to(device)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
        )
        new_tokens = output[0, input_ids.shape[1] :]
        return self.tokenizer.decode(
            new_tokens, skip_special_tokens=self.spec.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _chat_inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask of the chat, as the official code builds them for this model."""
        messages = self.spec.messages(prompt)
        if self.spec.tokenize_in_template:
            return self.tokenizer.apply_chat_template(
                messages,
                tokenize=True,
                add_generation_prompt=True,
                return_dict=True,
                return_tensors="pt",
                enable_thinking=False,
            )
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=self.chat_template
        )
        return self.tokenizer([text], return_tensors="pt")


def _refuse_missing_weights(path: Path, class_name: str, missing: list[str]) -> None:
    """transformers only warns about weights a folder lacks and leaves them random: refuse instead."""
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{path} does not hold {len(missing)} weights of {class_name} ({shown}); they would run at random. "
            "Check that the folder is the complete reprompt model (re-download it) and that its config.json "
            "describes these weights"
        )


def _remote_tokenizer_code(path: Path) -> str | None:
    """The custom tokenizer class that the folder's tokenizer_config.json or config.json points at, if any."""
    for name in ("tokenizer_config.json", "config.json"):
        config_path = path / name
        if not config_path.is_file():
            continue
        content = _read_json_object(config_path)
        auto_map = content.get("auto_map") or {}
        entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
        if entry:
            return ", ".join(str(item) for item in entry if item) if isinstance(entry, list) else str(entry)
    return None


def _processor_chat_template(path: Path) -> str | None:
    """The processor's chat template (what the official 32B code renders with), when the folder has one."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        return _read_json_object(path / "chat_template.json").get("chat_template")
    return None


def _read_json_object(path: Path) -> dict:
    """A JSON object from `path`; anything else is a CheckpointError naming the file."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); download the reprompt folder again") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} must hold a JSON object; download the reprompt folder again")
    return content
