"""The MLLM prompt encoder: Qwen2.5-VL-7B-Instruct's language model read as a text encoder.

The official encoder runs the whole vision-language model with `output_hidden_states=True` and keeps
`hidden_states[-(hidden_state_skip_layer + 1)]`, i.e. `hidden_states[-3]`: the output of all decoder layers but
the last two, before the final norm. Only that much is built here: the token embeddings and the first
`num_hidden_layers - 2` decoder layers. The vision tower, the last two decoder layers, the final norm and the
LM head are never read from the checkpoint. Everything else follows the official encoder: the template, right
padding to `text_length + crop_start` tokens, the instruction tokens cropped from the output and the mask alike.

Position ids are given explicitly as the official code computes them with its pinned transformers (4.56):
0, 1, 2, ... on the prompt and 1 on padding. Valid positions do not depend on this; padding positions then match
the official run on every transformers version (transformers 5 itself would count on through the padding).

Released layout (`text_encoder/llm`, Qwen/Qwen2.5-VL-7B-Instruct): five safetensors shards with
`model.safetensors.index.json`, keys in the legacy form `model.*` / `visual.*` / `lm_head.*` (transformers >= 4.52
renames them on load with `_checkpoint_conversion_mapping`; sd-scripts renames `model.` to
`model.language_model.` itself); a folder re-saved by transformers 5 has `model.language_model.*`. Both are read.

Supported: transformers 4.56 to 5.x (tested with 4.56.0, 4.57.1 and 5.23.0).
"""

import copy
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from loguru import logger
from torch import nn

from hyimage.errors import CheckpointError
from hyimage.loading.safetensors_header import read_tensor_infos, read_weight_map
from hyimage.loading.safetensors_io import GetTensor, TensorSource, load_safetensors_into
from hyimage.loading.torch_io import transformers_errors
from hyimage.stages import TEXT_ENCODER
from hyimage.text_encoders.templates import PromptTemplate, get_template

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

HIDDEN_STATE_SKIP_LAYER = 2
"""Decoder layers skipped at the end of the stack (the official `hidden_state_skip_layer`)."""
MAX_LAYERS = 1024
"""More decoder layers than any language model has: a config beyond it is refused before anything is built."""


def _require_transformers():
    try:
        from transformers import AutoTokenizer, Qwen2_5_VLConfig  # deferred: transformers is heavy; checked here
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (  # deferred: as above
            Qwen2_5_VLTextModel,
        )
    except ImportError as error:
        raise ImportError(
            "the MLLM text encoder needs transformers with Qwen2.5-VL support: pip install 'transformers>=4.56'"
        ) from error
    return AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLTextModel


def _check_depth(config_file: Path) -> None:
    """`num_hidden_layers` of the raw config.json, checked before transformers builds per-layer lists from it."""
    try:
        content = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # transformers' own error, wrapped to name the folder
    sections = [content, content.get("text_config")] if isinstance(content, dict) else []
    for section in sections:
        if isinstance(section, dict) and "num_hidden_layers" in section:
            layers = section["num_hidden_layers"]
            if type(layers) is not int or not HIDDEN_STATE_SKIP_LAYER < layers <= MAX_LAYERS:
                raise CheckpointError(
                    f"{config_file}: num_hidden_layers must be an integer in "
                    f"[{HIDDEN_STATE_SKIP_LAYER + 1}, {MAX_LAYERS}] (Qwen2.5-VL-7B has 28), got {layers!r}"
                )


def _stored_keys(path: Path) -> dict[str, Path]:
    """Each tensor name of a safetensors checkpoint folder, with the file holding it."""
    index = path / "model.safetensors.index.json"
    if os.path.lexists(index):
        return read_weight_map(index)
    single = path / "model.safetensors"
    if os.path.lexists(single):
        return dict.fromkeys(read_tensor_infos(single), single)
    raise FileNotFoundError(
        f"{path} has neither model.safetensors.index.json nor model.safetensors; "
        "fetch Qwen2.5-VL-7B-Instruct into text_encoder/llm with `hyimage download` (see ckpts/README.md)"
    )


def _text_model_prefix(keys: Iterable[str], path: Path) -> str:
    keys = set(keys)
    for prefix in ("model.language_model.", "model."):
        if f"{prefix}embed_tokens.weight" in keys:
            return prefix
    raise CheckpointError(
        f"no language model weights in {path}: expected 'model.embed_tokens.weight' "
        "(or 'model.language_model.embed_tokens.weight'); is this a Qwen2.5-VL checkpoint?"
    )


def text_model_sources(path: Path, wanted: Iterable[str]) -> list[TensorSource]:
    """The shards holding the text-model tensors `wanted`, each reading only those, named as the text model names them."""
    stored = _stored_keys(path)
    prefix = _text_model_prefix(stored, path)
    wanted = set(wanted)

    def translate(keys: Iterable[str], get_tensor: GetTensor) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            name = key.removeprefix(prefix)
            if key.startswith(prefix) and name in wanted:
                yield name, get_tensor(key)

    files = dict.fromkeys(file for key, file in stored.items() if key.removeprefix(prefix) in wanted)
    return [TensorSource(file, translate) for file in files]


def _rebuild_rotary_embeddings(model: nn.Module, config: "PretrainedConfig", device: torch.device) -> None:
    """Create the RoPE modules for real: their buffers are computed from the config, never stored."""
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            parent, _, attr = name.rpartition(".")
            with torch.device(device):
                setattr(model.get_submodule(parent), attr, type(module)(config=config))


class MLLMTextEncoder(nn.Module):
    """Prompt embeddings from Qwen2.5-VL's language model, as the official `TextEncoder` computes them."""

    memory_stage = TEXT_ENCODER

    def __init__(
        self,
        model: nn.Module,
        tokenizer: "PreTrainedTokenizerBase",
        template: str | PromptTemplate = "dit-llm-encode-v2",
        *,
        max_length: int | None = None,
        cache_size: int = 8,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.max_length = max_length if max_length is not None else self.template.text_length
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        template: str | PromptTemplate = "dit-llm-encode-v2",
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
        cache_size: int = 8,
        verify: bool = False,
        progress_bar: bool = True,
    ) -> "MLLMTextEncoder":
        """Load the tokenizer and the needed part of the language model from `text_encoder/llm`.

        `verify`: refuse NaN/Inf weights, naming the tensor and shard. `progress_bar`: a byte bar on stderr while
        reading (only when stderr is a terminal).
        """
        AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLTextModel = _require_transformers()
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path / 'config.json'} not found: pass the Qwen2.5-VL-7B-Instruct folder (ckpts/text_encoder/llm)"
            )
        _check_depth(path / "config.json")
        with transformers_errors(path, "Qwen2.5-VL configuration", file="config.json"):
            config = copy.deepcopy(Qwen2_5_VLConfig.from_pretrained(path).text_config)
        config.num_hidden_layers -= HIDDEN_STATE_SKIP_LAYER
        config.layer_types = config.layer_types[: config.num_hidden_layers]
        config._attn_implementation = "sdpa"
        device = torch.device(device)

        with transformers_errors(path, "Qwen2.5-VL tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right")

        with torch.device("meta"):
            model = Qwen2_5_VLTextModel(config)
        model.norm = nn.Identity()  # hidden_states[-3] is read before the final norm
        _rebuild_rotary_embeddings(model, config, device)
        wanted = model.state_dict().keys()
        load_safetensors_into(
            model,
            text_model_sources(path, wanted),
            dtype=dtype,
            device=device,
            verify=verify,
            progress=f"reading text encoder {path.name}" if progress_bar else None,
        )
        model.requires_grad_(False).eval()
        logger.info(f"MLLM text encoder: {config.num_hidden_layers} decoder layers from {path}, {dtype}, {device}")
        return cls(model, tokenizer, template, max_length=max_length, cache_size=cache_size)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Template applied, right-padded and truncated to `max_length + crop_start` tokens."""
        return self.tokenizer(
            [self.template.format(prompt) for prompt in prompts],
            max_length=self.max_length + self.template.crop_start,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, max_length, hidden_size) and mask (B, max_length, int64) of `prompts`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError('encode() needs at least one prompt (use "" for the empty negative prompt)')
        results = {}
        for prompt in dict.fromkeys(prompts):
            key = (prompt, self.dtype)
            if key in self._cache:
                self._cache.move_to_end(key)
                results[prompt] = self._cache[key]
        new = [prompt for prompt in dict.fromkeys(prompts) if prompt not in results]
        if new:
            embeds, mask = self._run(new)
            for i, prompt in enumerate(new):
                results[prompt] = (embeds[i], mask[i])
                stored = (embeds[i].to("cpu", copy=True), mask[i].to("cpu", copy=True))
                self._remember((prompt, self.dtype), stored)
        embeds = torch.stack([results[prompt][0].to(self.device) for prompt in prompts])
        mask = torch.stack([results[prompt][1].to(self.device) for prompt in prompts])
        return embeds, mask

    forward = encode

    def clear_cache(self) -> None:
        self._cache.clear()

    def _run(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenize(prompts)
        input_ids = tokens["input_ids"].to(self.device)
        attention_mask = tokens["attention_mask"].to(self.device)
        for prompt, last in zip(prompts, tokens["attention_mask"][:, -1].tolist()):
            if last:
                logger.warning(f"prompt cut to {self.max_length} tokens (the model's limit): {prompt[:80]!r}...")
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        crop = self.template.crop_start
        return hidden[:, crop:], attention_mask[:, crop:].long()

    def _remember(self, key: tuple[str, torch.dtype], value: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = value
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
