"""Where each part of a release lives in the official `ckpts/` layout."""

import os
from dataclasses import dataclass
from pathlib import Path

from hyimage.variants import DIT_FILE_STEMS, REPROMPT_DIRS

MODEL_ROOT_ENV = "HUNYUANIMAGE_V2_1_MODEL_ROOT"



def model_root(root: str | os.PathLike | None = None) -> Path:
    """The checkpoint root: `root` if given, else $HUNYUANIMAGE_V2_1_MODEL_ROOT, else ./ckpts."""
    return Path(root if root is not None else os.environ.get(MODEL_ROOT_ENV, "./ckpts"))


@dataclass(frozen=True)
class CheckpointLayout:
    """Paths of the official layout below one root (see ckpts/README.md)."""

    root: Path

    def dit(self, variant: str) -> Path:
        return self.root / "dit" / f"{self._stem(variant)}.safetensors"

    def dit_fp8(self, variant: str) -> Path:
        return self.root / "dit" / f"{self._stem(variant)}_fp8.safetensors"

    def dit_fp8_scale(self, variant: str) -> Path:
        return self.root / "dit" / f"{self._stem(variant)}_fp8_scale.safetensors"

    def dit_config(self, variant: str) -> Path:
        """Optional constructor arguments (JSON) for a DiT that is not the released size, e.g. a tiny test model."""
        return self.root / "dit" / f"{self._stem(variant)}.json"

    @property
    def vae(self) -> Path:
        return self.root / "vae" / "vae_2_1"

    @property
    def refiner_vae(self) -> Path:
        return self.root / "vae" / "vae_refiner"

    @property
    def text_encoder(self) -> Path:
        return self.root / "text_encoder" / "llm"

    @property
    def byt5(self) -> Path:
        return self.root / "text_encoder" / "byt5-small"

    @property
    def glyph(self) -> Path:
        return self.root / "text_encoder" / "Glyph-SDXL-v2"

    @property
    def glyph_checkpoint(self) -> Path:
        """The official (ModelScope) Glyph-SDXL-v2 weights."""
        return self.glyph / "checkpoints" / "byt5_model.pt"

    @property
    def glyph_assets(self) -> tuple[Path, Path]:
        return self.glyph / "assets" / "color_idx.json", self.glyph / "assets" / "multilingual_10-lang_idx.json"

    @property
    def glyph_diffusers(self) -> tuple[Path, Path]:
        """The same encoder in the diffusers layout (the Hub route `hyimage download` takes)."""
        return self.glyph / "text_encoder_2", self.glyph / "tokenizer_2"

    def reprompt(self, size: str = "32b") -> Path:
        if size not in REPROMPT_DIRS:
            raise ValueError(f"reprompt model {size!r} is unknown; choose one of {sorted(REPROMPT_DIRS)}")
        return self.root / REPROMPT_DIRS[size]

    @staticmethod
    def _stem(variant: str) -> str:
        if variant not in DIT_FILE_STEMS:
            raise ValueError(f"model variant {variant!r} is unknown; choose one of {sorted(DIT_FILE_STEMS)}")
        return DIT_FILE_STEMS[variant]
