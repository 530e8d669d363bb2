"""What one configuration of the pipeline needs on disk, and where each part comes from.

All on the Hugging Face Hub:
- DiTs, VAEs and the 7B reprompt model: `tencent/HunyuanImage-2.1` (`dit/`, `vae/`, `reprompt/`).
- The MLLM text encoder: `Qwen/Qwen2.5-VL-7B-Instruct` -> `text_encoder/llm`.
- The ByT5 configuration and tokenizer: `google/byt5-small` -> `text_encoder/byt5-small`.
- The Glyph-SDXL-v2 ByT5 encoder: upstream it is on ModelScope only (`AI-ModelScope/Glyph-SDXL-v2`).
  On the Hub the same weights, with the colour and font tokens already added to the tokenizer,
  are the `text_encoder_2/` and `tokenizer_2/` folders of `hunyuanvideo-community/HunyuanImage-2.1-Diffusers`;
  they land in `text_encoder/Glyph-SDXL-v2/`, where the glyph loader reads either format.
- PromptEnhancer-32B: `PromptEnhancer/PromptEnhancer-32B` -> `reprompt_32b`.
"""

import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from hyimage.checkpoints.hub import Listing, is_repo_id
from hyimage.errors import DownloadError
from hyimage.variants import BASE, DIT_FILE_STEMS, REFINER, REPROMPT_DIRS, TEXT_TO_IMAGE

OFFICIAL_REPO = "tencent/HunyuanImage-2.1"
QWEN_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
BYT5_REPO = "google/byt5-small"
GLYPH_REPO = "hunyuanvideo-community/HunyuanImage-2.1-Diffusers"
REPROMPT_32B_REPO = "PromptEnhancer/PromptEnhancer-32B"
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken", "*.py")
VARIANTS = TEXT_TO_IMAGE


@dataclass(frozen=True)
class DownloadConfig:
    """What one configuration of the pipeline needs on disk."""

    variant: str = BASE
    fp8: bool = False
    refiner: bool = True
    reprompt: str | None = None
    text_encoder: bool = True
    glyph: bool = True
    base: bool = True  # False: the refiner alone (`hyimage refine`), without the variant's DiT and image VAE
    repo_id: str = OFFICIAL_REPO  # the repository holding dit/, vae/ and reprompt/ in the official layout

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is unknown; choose one of {', '.join(VARIANTS)}")
        if self.reprompt is not None and self.reprompt not in REPROMPT_DIRS:
            raise ValueError(f"reprompt {self.reprompt!r} is unknown; choose one of {', '.join(REPROMPT_DIRS)}")
        if not is_repo_id(self.repo_id):
            raise ValueError(f"repo_id {self.repo_id!r} is not a Hub repository id such as {OFFICIAL_REPO!r}")

    def command(self, root: str | os.PathLike | None = None) -> str:
        """The `hyimage download` command line that fetches this configuration (into `root` when given)."""
        parts = ["hyimage download", f"--variant {self.variant}" if self.base else "--refiner-only"]
        if self.fp8:
            parts.append("--fp8")
        if not self.refiner and self.base:
            parts.append("--no-refiner")
        if self.reprompt:
            parts.append(f"--reprompt {self.reprompt}")
        if self.repo_id != OFFICIAL_REPO:
            parts.append(f"--repo-id {self.repo_id}")
        if root is not None:
            parts.append(f"--model-root {root}")
        return " ".join(parts)

    def describe(self) -> str:
        """E.g. 'hunyuanimage-v2.1-distilled (FP8) with the refiner'."""
        fp8 = " (FP8)" if self.fp8 else ""
        if not self.base:
            return "the refiner" + fp8
        extras = ["the refiner"] if self.refiner else []
        if self.reprompt:
            extras.append(f"the {self.reprompt} reprompt model")
        return self.variant + fp8 + (" with " + " and ".join(extras) if extras else "")


@dataclass(frozen=True)
class Source:
    """Files of one Hub repository that go below one folder of the layout."""

    repo_id: str
    patterns: tuple[str, ...]
    local_dir: str
    purpose: str


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: where it is on the Hub, where it goes, and how to check it."""

    repo_id: str
    revision: str
    path: str
    destination: Path
    size: int
    sha256: str | None
    blob_id: str | None
    local_dir: Path

    @property
    def present(self) -> bool:
        return self.destination.is_file() and self.destination.stat().st_size == self.size

    @property
    def hash_id(self) -> str | None:
        """'sha256:<hex>' or 'git-sha1:<hex>', as recorded."""
        if self.sha256:
            return "sha256:" + self.sha256
        return "git-sha1:" + self.blob_id if self.blob_id else None


def _dit_files(variant: str, fp8: bool) -> tuple[str, ...]:
    stem = DIT_FILE_STEMS[variant]
    if fp8:
        return (f"dit/{stem}_fp8.safetensors", f"dit/{stem}_fp8_scale.safetensors")
    return (f"dit/{stem}.safetensors",)


def sources(config: DownloadConfig) -> list[Source]:
    """The repositories and file patterns `config` needs (a `*` does not cross a `/`)."""
    official = [*_dit_files(config.variant, config.fp8), "vae/vae_2_1/*"] if config.base else []
    if config.refiner or not config.base:
        official += [*_dit_files(REFINER, config.fp8), "vae/vae_refiner/*"]
    if config.reprompt == "7b":
        official.append("reprompt/*")
    found = [Source(config.repo_id, tuple(official), "", f"{config.describe()} DiT and VAE files")]
    if config.text_encoder:
        found.append(Source(QWEN_REPO, MODEL_FILES, "text_encoder/llm", "Qwen2.5-VL text encoder"))
    if config.glyph and config.base:
        found.append(Source(BYT5_REPO, ("*.json",), "text_encoder/byt5-small", "ByT5 configuration and tokenizer"))
        glyph_files = ("text_encoder_2/*", "tokenizer_2/*")
        found.append(Source(GLYPH_REPO, glyph_files, "text_encoder/Glyph-SDXL-v2", "Glyph-SDXL-v2 ByT5"))
    if config.reprompt == "32b":
        found.append(Source(REPROMPT_32B_REPO, MODEL_FILES, REPROMPT_DIRS["32b"], "PromptEnhancer-32B"))
    return found


def _exact(pattern: str) -> bool:
    return not any(c in pattern for c in "*?[")


def _matches(name: str, pattern: str) -> bool:
    """Shell-style match per path segment: `*` stays within a segment and does not match a leading dot."""
    names, patterns = name.split("/"), pattern.split("/")
    return len(names) == len(patterns) and all(
        fnmatchcase(n, p) and (not n.startswith(".") or p.startswith(".")) for n, p in zip(names, patterns)
    )


def files_of(source: Source, listing: Listing, root: Path) -> list[RemoteFile]:
    """The files of `listing` that `source` asks for, each with its destination below `root`."""
    for pattern in source.patterns:
        if _exact(pattern) and pattern not in listing.files:
            raise DownloadError(
                f"{listing.repo_id} has no file {pattern} (needed for the {source.purpose}); "
                "the repository may have changed: please report this"
            )
    files = []
    for name, info in sorted(listing.files.items()):
        if not any(_matches(name, p) for p in source.patterns):
            continue
        files.append(
            RemoteFile(
                repo_id=listing.repo_id,
                revision=listing.revision,
                path=name,
                destination=root / source.local_dir / name,
                size=info.size,
                sha256=info.sha256,
                blob_id=info.blob_id,
                local_dir=root / source.local_dir,
            )
        )
    return files
