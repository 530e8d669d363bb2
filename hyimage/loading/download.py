"""Fetch exactly the checkpoint files one configuration needs, into the official `ckpts/` layout.

Where each part comes from (all on the Hugging Face Hub):
- DiTs, VAEs and the 7B reprompt model: `tencent/HunyuanImage-2.1` (`dit/`, `vae/`, `reprompt/`).
- The MLLM text encoder: `Qwen/Qwen2.5-VL-7B-Instruct` -> `text_encoder/llm`.
- The ByT5 configuration and tokenizer: `google/byt5-small` -> `text_encoder/byt5-small`.
- The Glyph-SDXL-v2 ByT5 encoder: upstream it is on ModelScope only (`AI-ModelScope/Glyph-SDXL-v2`).
  On the Hub the same weights, with the colour and font tokens already added to the tokenizer,
  are the `text_encoder_2/` and `tokenizer_2/` folders of `hunyuanvideo-community/HunyuanImage-2.1-Diffusers`;
  they land in `text_encoder/Glyph-SDXL-v2/`, where the glyph loader reads either format.
- PromptEnhancer-32B: `PromptEnhancer/PromptEnhancer-32B` -> `reprompt_32b`.

Each file is downloaded over HTTP into `<file>.incomplete` next to its destination and moved in
place when its size and hash (sha256 for LFS files, the git blob id otherwise) match the Hub's
metadata. An interrupted download resumes from the bytes already on disk. Files already
present with the right size are kept. `HF_ENDPOINT` selects a mirror; `HF_TOKEN` is sent when set.
"""

import fnmatch
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import build_hf_headers
from loguru import logger
from tqdm.auto import tqdm

from hyimage.loading.layout import DIT_FILE_STEMS, REPROMPT_DIRS, model_root

OFFICIAL_REPO = "tencent/HunyuanImage-2.1"
QWEN_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
BYT5_REPO = "google/byt5-small"
GLYPH_REPO = "hunyuanvideo-community/HunyuanImage-2.1-Diffusers"
REPROMPT_32B_REPO = "PromptEnhancer/PromptEnhancer-32B"
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken", "*.py")
CHUNK_BYTES = 8 * 1024 * 1024
VARIANTS = ("hunyuanimage-v2.1", "hunyuanimage-v2.1-distilled")
NETWORK_ERROR_MODULES = ("httpx", "httpx2", "requests", "urllib3")


class DownloadError(RuntimeError):
    """A file could not be fetched or did not arrive intact."""


class HubUnreachableError(DownloadError):
    """The Hub (or the mirror in HF_ENDPOINT) did not answer."""


@dataclass(frozen=True)
class DownloadConfig:
    """What one configuration of the pipeline needs on disk."""

    variant: str = "hunyuanimage-v2.1"
    fp8: bool = False
    refiner: bool = True
    reprompt: str | None = None
    text_encoder: bool = True
    glyph: bool = True
    base: bool = True  # False: the refiner alone (`hyimage refine`), without the variant's DiT and image VAE

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is unknown; choose one of {', '.join(VARIANTS)}")
        if self.reprompt is not None and self.reprompt not in REPROMPT_DIRS:
            raise ValueError(f"reprompt {self.reprompt!r} is unknown; choose one of {', '.join(REPROMPT_DIRS)}")

    def command(self, root: str | os.PathLike | None = None) -> str:
        """The `hyimage download` command line that fetches this configuration (into `root` when given)."""
        parts = ["hyimage download", f"--variant {self.variant}" if self.base else "--refiner-only"]
        if self.fp8:
            parts.append("--fp8")
        if not self.refiner and self.base:
            parts.append("--no-refiner")
        if self.reprompt:
            parts.append(f"--reprompt {self.reprompt}")
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
    purpose: str

    @property
    def present(self) -> bool:
        return self.destination.is_file() and self.destination.stat().st_size == self.size


def _dit_files(variant: str, fp8: bool) -> tuple[str, ...]:
    stem = DIT_FILE_STEMS[variant]
    if fp8:
        return (f"dit/{stem}_fp8.safetensors", f"dit/{stem}_fp8_scale.safetensors")
    return (f"dit/{stem}.safetensors",)


def sources(config: DownloadConfig) -> list[Source]:
    """The repositories and file patterns `config` needs."""
    official = [*_dit_files(config.variant, config.fp8), "vae/vae_2_1/*"] if config.base else []
    if config.refiner or not config.base:
        official += [*_dit_files("hunyuanimage-refiner", config.fp8), "vae/vae_refiner/*"]
    if config.reprompt == "7b":
        official.append("reprompt/*")
    found = [Source(OFFICIAL_REPO, tuple(official), "", f"{config.describe()} DiT and VAE files")]
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


def list_files(
    config: DownloadConfig,
    root: str | os.PathLike | None = None,
    *,
    endpoint: str | None = None,
    token: str | None = None,
) -> list[RemoteFile]:
    """Every file `config` needs, with its size and hash from the Hub's metadata."""
    root = model_root(root)
    endpoint = hub_endpoint(endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    files = []
    for source in sources(config):
        info = _repo_info(api, source.repo_id, endpoint)
        siblings = {s.rfilename: s for s in info.siblings or []}
        for pattern in source.patterns:
            if _exact(pattern) and pattern not in siblings:
                raise DownloadError(
                    f"{source.repo_id} has no file {pattern} (needed for the {source.purpose}); "
                    "the repository may have changed: please report this"
                )
        for name, sibling in sorted(siblings.items()):
            if not any(fnmatch.fnmatch(name, p) for p in source.patterns):
                continue
            files.append(
                RemoteFile(
                    repo_id=source.repo_id,
                    revision=info.sha,
                    path=name,
                    destination=root / source.local_dir / name,
                    size=sibling.lfs.size if sibling.lfs else sibling.size,
                    sha256=sibling.lfs.sha256 if sibling.lfs else None,
                    blob_id=None if sibling.lfs else sibling.blob_id,
                    purpose=source.purpose,
                )
            )
    return files


def _repo_info(api: HfApi, repo_id: str, endpoint: str | None):
    try:
        return api.model_info(repo_id, files_metadata=True)
    except HfHubHTTPError as error:
        raise DownloadError(f"the Hub refused to list {repo_id}: {error}") from error
    except Exception as error:
        if _is_network_error(error):
            raise _unreachable(endpoint, error) from error
        raise


def _is_network_error(error: Exception) -> bool:
    """Connection, DNS and timeout failures, including the HTTP client's own (not OSError) types."""
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in NETWORK_ERROR_MODULES


def hub_endpoint(endpoint: str | None = None) -> str:
    """`endpoint`, else the one huggingface_hub uses ($HF_ENDPOINT or https://huggingface.co)."""
    return (endpoint or constants.ENDPOINT).rstrip("/")


def _unreachable(endpoint: str | None, error: Exception) -> HubUnreachableError:
    return HubUnreachableError(
        f"could not reach the Hugging Face Hub at {hub_endpoint(endpoint)} ({type(error).__name__}: {error}). "
        "Check the network connection, or set HF_ENDPOINT to a reachable mirror "
        "(e.g. HF_ENDPOINT=https://hf-mirror.com), then run the command again: it resumes where it stopped."
    )


def download(
    config: DownloadConfig,
    root: str | os.PathLike | None = None,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Fetch what `config` lacks below `root` (default: the model root); returns the files fetched."""
    files = list_files(config, root, endpoint=endpoint, token=token)
    fetched = []
    for file in files:
        if file.present:
            continue
        fetch_file(file, endpoint=endpoint, token=token, progress=progress)
        fetched.append(file.destination)
    return fetched


def missing_files(files: list[RemoteFile]) -> list[RemoteFile]:
    """The files not yet on disk (or with the wrong size)."""
    return [f for f in files if not f.present]


def fetch_file(
    file: RemoteFile, *, endpoint: str | None = None, token: str | None = None, progress: bool = True
) -> Path:
    """Download one file, resuming a partial one, and check it against the Hub's metadata."""
    file.destination.parent.mkdir(parents=True, exist_ok=True)
    partial = file.destination.with_name(file.destination.name + ".incomplete")
    done = partial.stat().st_size if partial.exists() else 0
    if done > file.size:
        partial.unlink()
        done = 0
    if done < file.size:
        _stream(file, partial, done, endpoint=endpoint, token=token, progress=progress)
    _verify(file, partial)
    partial.replace(file.destination)
    logger.info("fetched {} ({})", file.destination, human_size(file.size))
    return file.destination


def _stream(
    file: RemoteFile, partial: Path, done: int, *, endpoint: str | None, token: str | None, progress: bool
) -> None:
    url = f"{hub_endpoint(endpoint)}/{file.repo_id}/resolve/{quote(file.revision, safe='')}/{quote(file.path)}"
    request = urllib.request.Request(url)
    for key, value in build_hf_headers(token=token).items():
        request.add_unredirected_header(key, value)
    if done:
        request.add_header("Range", f"bytes={done}-")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"the Hub answered {error.code} for {url}") from error
    except OSError as error:
        raise _unreachable(endpoint, error) from error
    with response:
        if done and response.status != 206:
            done = 0  # the server ignored the range: start over
        bar = tqdm(
            total=file.size, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
            desc=file.path, disable=not progress, leave=False,
        )
        with bar, open(partial, "ab" if done else "wb") as out:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:
                raise DownloadError(
                    f"the transfer of {file.path} from {file.repo_id} stopped at {out.tell()} of {file.size} bytes "
                    f"({error}); run the command again to resume"
                ) from error


def _verify(file: RemoteFile, partial: Path) -> None:
    size = partial.stat().st_size
    if size != file.size:
        raise DownloadError(
            f"{file.path} from {file.repo_id} arrived with {size} bytes instead of {file.size}; "
            "run the command again to resume"
        )
    if file.sha256 is not None:
        digest = _hash_file(partial, hashlib.sha256())
        expected = file.sha256
    elif file.blob_id is not None:
        digest = _hash_file(partial, hashlib.sha1(f"blob {size}\0".encode()))
        expected = file.blob_id
    else:
        return
    if digest != expected:
        partial.unlink()
        raise DownloadError(
            f"{file.path} from {file.repo_id} is corrupt (hash {digest}, expected {expected}); "
            "it was deleted, run the command again"
        )


def _hash_file(path: Path, digest) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def human_size(size: int) -> str:
    """1536 -> '1.5 KiB'."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"
