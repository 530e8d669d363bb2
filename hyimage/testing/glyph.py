"""Tiny ByT5 glyph checkpoints in the official layout (byt5-small + Glyph-SDXL-v2), random weights."""

import json
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

COLOR_COUNT = 138
FONT_COUNT = 988
FONT_LANGUAGES = ("en", "cn", "jp", "kr", "de", "fr", "it", "es", "pt", "ru")
BYT5_VOCAB = 384
GLYPH_VOCAB = BYT5_VOCAB + COLOR_COUNT + FONT_COUNT


def write_glyph_assets(glyph_dir: str | Path) -> Path:
    """`assets/color_idx.json` (138 colours) and `assets/multilingual_10-lang_idx.json` (988 fonts).

    Same format as Glyph-SDXL-v2's files: name -> index, font names start with a 2-letter
    language code; the names themselves are synthetic.
    """
    assets = Path(glyph_dir) / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    colors = {f"color{i:03d}": i for i in range(COLOR_COUNT)}
    fonts = {f"{FONT_LANGUAGES[i % len(FONT_LANGUAGES)]}-Font{i:03d}-Regular": i for i in range(FONT_COUNT)}
    (assets / "color_idx.json").write_text(json.dumps(colors))
    (assets / "multilingual_10-lang_idx.json").write_text(json.dumps(fonts))
    return assets


def tiny_t5_config(vocab_size: int = BYT5_VOCAB, d_model: int = 32) -> T5Config:
    """A 2-layer T5 with byt5-small's kind of feed-forward (gated GELU)."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        tokenizer_class="ByT5Tokenizer",
    )


def write_tiny_byt5(byt5_dir: str | Path, d_model: int = 32) -> T5Config:
    """A `byt5-small`-like folder: config.json and the ByT5 tokenizer files (no weights: Glyph replaces them all)."""
    byt5_dir = Path(byt5_dir)
    config = tiny_t5_config(BYT5_VOCAB, d_model)
    config.save_pretrained(byt5_dir)
    ByT5Tokenizer().save_pretrained(byt5_dir)
    return config


def tiny_glyph_encoder(d_model: int = 32, seed: int = 0) -> T5EncoderModel:
    """A random tiny T5 encoder with the Glyph vocabulary (1510 tokens), as the checkpoint carries it."""
    torch.manual_seed(seed)
    model = T5EncoderModel(tiny_t5_config(GLYPH_VOCAB, d_model)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def write_glyph_checkpoint(path: str | Path, t5_encoder: T5EncoderModel) -> Path:
    """`byt5_model.pt` as Glyph-ByT5's training script saves it (epoch, name, state_dict, optimizer,
    scaler), the encoder under `module.text_tower.encoder.` next to other modules' keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = OrderedDict((f"module.text_tower.encoder.{k}", v.clone()) for k, v in t5_encoder.encoder.state_dict().items())
    state["module.logit_scale"] = torch.tensor(4.6)
    state["module.visual.proj"] = torch.randn(4, 4)
    optimizer = {
        "state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(4, 4), "exp_avg_sq": torch.zeros(4, 4)}},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.2, "params": [0]}],
    }
    checkpoint = {"epoch": 5, "name": "glyph-byt5", "state_dict": state, "optimizer": optimizer, "scaler": {"scale": 65536.0}}
    torch.save(checkpoint, path)
    return path


def write_glyph_release(text_encoder_dir: str | Path, d_model: int = 32, seed: int = 0) -> T5EncoderModel:
    """`byt5-small/` and `Glyph-SDXL-v2/` under `text_encoder_dir`; returns the encoder written."""
    text_encoder_dir = Path(text_encoder_dir)
    write_tiny_byt5(text_encoder_dir / "byt5-small", d_model)
    write_glyph_assets(text_encoder_dir / "Glyph-SDXL-v2")
    encoder = tiny_glyph_encoder(d_model, seed)
    write_glyph_checkpoint(text_encoder_dir / "Glyph-SDXL-v2" / "checkpoints" / "byt5_model.pt", encoder)
    return encoder
