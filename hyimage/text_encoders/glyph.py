"""The ByT5 glyph encoder: the quoted text of a prompt as (B, 128, 1472) states for the DiT.

Official layout (`ckpts/text_encoder/`):
    byt5-small/config.json                        the T5 architecture and the ByT5 tokenizer
    Glyph-SDXL-v2/assets/color_idx.json           138 colour names -> index
    Glyph-SDXL-v2/assets/multilingual_10-lang_idx.json   988 font codes -> index
    Glyph-SDXL-v2/checkpoints/byt5_model.pt       {"state_dict": {"module.text_tower.encoder.*": tensor}}
Evidence: the official `create_byt5` keeps the `module.text_tower.encoder.` keys of "state_dict" and loads them
strictly into a T5 encoder stack; diffusers' HunyuanVideo-1.5 conversion script reads the same file, raises on any
other key and expects `shared.weight` to be absent (the encoder's `embed_tokens` is the one embedding).
ComfyUI and sd-scripts read Comfy-Org's repackaged safetensors instead, never this file.
The tokenizer gains `<color-i>` for each colour, then `<xx-font-j>` (`xx` the code's first two
letters, `j` its index) for each font, in file order: 384 + 138 + 988 = 1510 tokens. The Glyph
checkpoint replaces every weight of the T5 encoder, so byt5-small's own weights are never read.

Diffusers layout: `text_encoder_2/` (a T5EncoderModel in safetensors) and `tokenizer_2/`
(the ByT5 tokenizer with the special tokens already added).
"""

import json
import os
from pathlib import Path

import torch
from loguru import logger
from torch import nn
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from hyimage.errors import CheckpointError
from hyimage.loading.safetensors_header import read_weight_map
from hyimage.loading.safetensors_io import SafetensorsReader
from hyimage.loading.torch_io import read_torch_file, tensor_state_dict, transformers_errors
from hyimage.loading.verify import check_state_finite
from hyimage.stages import GLYPH_ENCODER
from hyimage.text_encoders.glyph_prompt import glyph_prompt

GLYPH_MAX_LENGTH = 128
COLOR_FILE = Path("assets") / "color_idx.json"
FONT_FILE = Path("assets") / "multilingual_10-lang_idx.json"
CHECKPOINT_FILE = Path("checkpoints") / "byt5_model.pt"
CHECKPOINT_PREFIX = "module.text_tower."


def glyph_special_tokens(color_path: str | os.PathLike, font_path: str | os.PathLike) -> list[str]:
    """The colour tokens then the font tokens, in the order the official code adds them."""
    colors = _read_json(color_path)
    fonts = _read_json(font_path)
    return [f"<color-{i}>" for i in range(len(colors))] + [f"<{code[:2]}-font-{idx}>" for code, idx in fonts.items()]


def build_glyph_tokenizer(byt5_dir: str | os.PathLike, glyph_dir: str | os.PathLike) -> ByT5Tokenizer:
    """The ByT5 tokenizer of `byt5_dir` with Glyph-SDXL-v2's colour and font tokens added."""
    glyph_dir = Path(glyph_dir)
    with transformers_errors(byt5_dir, "ByT5 tokenizer"):
        tokenizer = ByT5Tokenizer.from_pretrained(os.fspath(byt5_dir))
    tokenizer.add_tokens(glyph_special_tokens(glyph_dir / COLOR_FILE, glyph_dir / FONT_FILE), special_tokens=True)
    return tokenizer


def load_glyph_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The T5EncoderModel state dict in a Glyph-SDXL-v2 `byt5_model.pt` (tensors only, no code run)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(
            f"Glyph checkpoint {path} not found; download it with "
            "`modelscope download --model AI-ModelScope/Glyph-SDXL-v2 --local_dir <ckpts>/text_encoder/Glyph-SDXL-v2`"
        )
    checkpoint = read_torch_file(path, "Glyph checkpoint")
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a Glyph-SDXL-v2 checkpoint: expected a dict with a 'state_dict' dict")
    state = tensor_state_dict(checkpoint, path)
    if "state_dict" in checkpoint:
        encoder = {k[len(CHECKPOINT_PREFIX) :]: v for k, v in state.items() if k.startswith(CHECKPOINT_PREFIX + "encoder.")}
    else:
        encoder = {f"encoder.{k}": v for k, v in state.items()}
    if "encoder.embed_tokens.weight" not in encoder:
        raise CheckpointError(
            f"{path} has no '{CHECKPOINT_PREFIX}encoder.embed_tokens.weight'; it is not a Glyph ByT5 checkpoint"
        )
    encoder["shared.weight"] = encoder["encoder.embed_tokens.weight"]
    return encoder


class GlyphByT5Encoder(nn.Module):
    """ByT5 encoder of the glyph prompt; `text_tower` holds the keys of `byt5_model.pt` without `module.`."""

    memory_stage = GLYPH_ENCODER

    def __init__(self, text_tower: T5EncoderModel, tokenizer: ByT5Tokenizer, max_length: int = GLYPH_MAX_LENGTH):
        super().__init__()
        if text_tower.get_input_embeddings().num_embeddings != len(tokenizer):
            raise ValueError(
                f"the ByT5 encoder has {text_tower.get_input_embeddings().num_embeddings} token embeddings but the "
                f"tokenizer {len(tokenizer)} tokens; use the color_idx.json and multilingual_10-lang_idx.json "
                "that ship with the checkpoint"
            )
        self.text_tower = text_tower
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        byt5_dir: str | os.PathLike,
        glyph_dir: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        verify: bool = False,
    ) -> "GlyphByT5Encoder":
        """Load the official layout: `text_encoder/byt5-small` and `text_encoder/Glyph-SDXL-v2`.

        `verify`: refuse NaN/Inf weights, naming the tensor and the file.
        """
        byt5_dir, glyph_dir = Path(byt5_dir), Path(glyph_dir)
        config_path = byt5_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} not found; download it with "
                "`hf download google/byt5-small --local-dir <ckpts>/text_encoder/byt5-small`"
            )
        for asset in (COLOR_FILE, FONT_FILE):
            if not (glyph_dir / asset).is_file():
                raise FileNotFoundError(
                    f"{glyph_dir / asset} not found; download Glyph-SDXL-v2 with "
                    "`modelscope download --model AI-ModelScope/Glyph-SDXL-v2 --local_dir <ckpts>/text_encoder/Glyph-SDXL-v2`"
                )
        tokenizer = build_glyph_tokenizer(byt5_dir, glyph_dir)
        with transformers_errors(byt5_dir, "ByT5 configuration", file="config.json"):
            config = T5Config.from_pretrained(os.fspath(byt5_dir))
        state = load_glyph_state_dict(glyph_dir / CHECKPOINT_FILE)
        if verify:
            check_state_finite(state, glyph_dir / CHECKPOINT_FILE)
        config.vocab_size = len(tokenizer)
        return cls(_build_text_tower(config, state, dtype, device, source=glyph_dir / CHECKPOINT_FILE), tokenizer)

    @classmethod
    def from_diffusers(
        cls,
        directory: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        verify: bool = False,
    ) -> "GlyphByT5Encoder":
        """Load the diffusers layout: `directory/text_encoder_2` and `directory/tokenizer_2` (`verify`: as above)."""
        directory = Path(directory)
        encoder_dir, tokenizer_dir = directory / "text_encoder_2", directory / "tokenizer_2"
        for needed in (encoder_dir / "config.json", tokenizer_dir):
            if not needed.exists():
                raise FileNotFoundError(f"{needed} not found; {directory} is not a diffusers HunyuanImage-2.1 folder")
        with transformers_errors(tokenizer_dir, "ByT5 tokenizer"):
            tokenizer = ByT5Tokenizer.from_pretrained(os.fspath(tokenizer_dir))
        with transformers_errors(encoder_dir, "ByT5 configuration", file="config.json"):
            config = T5Config.from_pretrained(os.fspath(encoder_dir))
        state = _read_safetensors_folder(encoder_dir)
        if verify:
            check_state_finite(state, encoder_dir)
        embeddings = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
        if embeddings is not None:
            state["shared.weight"] = state["encoder.embed_tokens.weight"] = embeddings
        return cls(_build_text_tower(config, state, dtype, device, source=encoder_dir), tokenizer)

    @property
    def device(self) -> torch.device:
        return self.text_tower.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_tower.shared.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.text_tower.config.d_model

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of formatted glyph prompts, right-padded and cut to `max_length`."""
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return tokens.input_ids, tokens.attention_mask.long()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Glyph states (B, max_length, d_model) and int64 mask (B, max_length) of user prompts.

        A prompt without quoted text gets zero states and an all-zero mask, as in the official
        pipeline; `mask.any(dim=1)` tells which prompts carry glyph text.
        """
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts; wrap a single prompt as [prompt]")
        states = torch.zeros(len(prompts), self.max_length, self.hidden_size, dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.int64, device=self.device)
        formatted = [glyph_prompt(prompt) for prompt in prompts]
        rows = [i for i, text in enumerate(formatted) if text is not None]
        if rows:
            input_ids, attention_mask = self.tokenize([formatted[i] for i in rows])
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
            output = self.text_tower(input_ids=input_ids, attention_mask=attention_mask.float())
            states[rows] = output.last_hidden_state.to(self.dtype)
            mask[rows] = attention_mask
        return states, mask

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts)


def _build_text_tower(
    config: T5Config,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: str | torch.device,
    source: Path,
) -> T5EncoderModel:
    """A T5EncoderModel built on `meta` whose parameters are `state`'s tensors (cast to `dtype`)."""
    with torch.device("meta"):
        model = T5EncoderModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit the T5 encoder of its config: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "check that byt5-small's config.json and the checkpoint belong together"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{source}: '{key}' has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}; "
                "use the color/font assets and byt5-small config that ship with this checkpoint"
            )
    keep_fp32 = dtype == torch.float16
    cast = {k: v.to(device=device, dtype=torch.float32 if keep_fp32 and ".wo." in k else dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    model.set_input_embeddings(model.shared)
    model.requires_grad_(False)
    return model.eval()


def _read_safetensors_folder(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors`, or of the shards an index lists, in `directory`."""
    index = directory / "model.safetensors.index.json"
    if os.path.lexists(index):
        shards = sorted(set(read_weight_map(index).values()))
    elif os.path.lexists(directory / "model.safetensors"):
        shards = [directory / "model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors (or index) in {directory}; download the folder again")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        with SafetensorsReader(shard) as reader:
            state.update((key, reader.get(key)) for key in reader.keys())
    logger.debug(f"read {len(state)} tensors from {directory}")
    return state


def _read_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
