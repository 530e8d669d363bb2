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

How a download goes:
- Local first. Each repository's file listing (names, sizes, hashes, commit) is recorded in
  `<root>/.cache/hyimage/downloads.json` the first time it is read, and every file is recorded with its
  size and modification time once its hash has been checked. When the listings a configuration needs are
  recorded and its files are present and unchanged since they were checked, no network call is made.
  A file whose modification time changed is hashed again before it is trusted (never its size alone).
- `HF_HUB_OFFLINE=1` is honoured: nothing is asked of the network, and what is missing is named.
- A file missing from the root but present in the Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME`) with
  the same content is hard-linked (else copied) instead of downloaded.
- The rest is fetched with `huggingface_hub.hf_hub_download(..., revision=<recorded commit>, local_dir=...)`:
  its retries and in-call resume, HF_ENDPOINT mirrors, HF_TOKEN, and Xet transfers when `hf_xet` is installed.
  Each file is then hashed (sha256 for LFS files, the git blob id otherwise) against the listing.
- Why the record and the cache look-up are ours: huggingface_hub's `local_dir` bookkeeping keeps no file
  list (so it cannot say offline what a configuration lacks) and needs a HEAD call per file unless pinned to
  a commit; its own cache reuse also needs that HEAD call, copies instead of linking, and checks no hash.
- Paths are checked before anything is written: a listing name that is absolute, has a drive letter, a
  backslash or a `..` segment is refused, and every destination must resolve inside the model root
  (a symlinked folder pointing elsewhere is refused).
"""

import hashlib
import inspect
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.file_download import repo_folder_name, try_to_load_from_cache
from huggingface_hub.utils import tqdm as hf_tqdm
from loguru import logger
from tqdm.auto import tqdm

from hyimage.errors import DownloadError, HubUnreachableError, OfflineError, UnsafeListingError
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
RECORD_FILE = Path(".cache") / "hyimage" / "downloads.json"
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


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


def is_repo_id(name: str) -> bool:
    """'owner/name' as the Hub spells repository ids."""
    return isinstance(name, str) and REPO_ID_RE.fullmatch(name) is not None and ".." not in name


@dataclass(frozen=True)
class Source:
    """Files of one Hub repository that go below one folder of the layout."""

    repo_id: str
    patterns: tuple[str, ...]
    local_dir: str
    purpose: str


@dataclass(frozen=True)
class FileInfo:
    """One file of a listing: its size and hash (sha256 for LFS files, else the git blob id)."""

    size: int
    sha256: str | None
    blob_id: str | None


@dataclass(frozen=True)
class Listing:
    """A repository's files at one commit."""

    repo_id: str
    revision: str
    files: dict[str, FileInfo]


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


@dataclass
class Plan:
    """What a configuration needs below a root, and what of it is missing or not yet checked."""

    root: Path
    config: DownloadConfig
    files: list[RemoteFile] = field(default_factory=list)
    missing: list[RemoteFile] = field(default_factory=list)
    unchecked: list[RemoteFile] = field(default_factory=list)  # present, not yet hashed (or changed since)
    unknown: list[Source] = field(default_factory=list)  # sources whose listing is not known here
    offline_reason: str | None = None  # why the Hub was not asked, when it was not
    record: "Record | None" = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unchecked and not self.unknown

    def fetch_bytes(self) -> int:
        return sum(f.size for f in self.missing)


def _dit_files(variant: str, fp8: bool) -> tuple[str, ...]:
    stem = DIT_FILE_STEMS[variant]
    if fp8:
        return (f"dit/{stem}_fp8.safetensors", f"dit/{stem}_fp8_scale.safetensors")
    return (f"dit/{stem}.safetensors",)


def sources(config: DownloadConfig) -> list[Source]:
    """The repositories and file patterns `config` needs (a `*` does not cross a `/`)."""
    official = [*_dit_files(config.variant, config.fp8), "vae/vae_2_1/*"] if config.base else []
    if config.refiner or not config.base:
        official += [*_dit_files("hunyuanimage-refiner", config.fp8), "vae/vae_refiner/*"]
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


def check_name(name: str, repo_id: str) -> None:
    """Refuse a listing name that is not a plain relative POSIX path (the Hub never returns one)."""
    segments = name.split("/")
    bad = (
        not name
        or "\\" in name
        or "\0" in name
        or name.startswith("/")
        or re.match(r"[A-Za-z]:", name) is not None
        or any(s in ("", ".", "..") for s in segments)
    )
    if bad:
        raise UnsafeListingError(
            f"the file listing of {repo_id} names {name!r}, which is not a relative path inside the repository "
            "(absolute, a drive letter, a backslash or a '..' segment); the Hub never lists such a name, so this "
            "listing is refused and nothing was written. Check HF_ENDPOINT points at the Hub or a faithful mirror"
        )


def check_inside(root: Path, file: "RemoteFile") -> None:
    """Refuse to write `file` unless its folder (and huggingface_hub's `.cache` beside it) resolve inside `root`."""
    base = root.resolve()
    for folder in (file.destination.parent, file.local_dir / ".cache"):
        resolved = folder.resolve()
        if resolved != base and base not in resolved.parents:
            raise UnsafeListingError(
                f"{file.destination} would be written below {resolved}, outside the model root {base} (a symlink "
                "points out of it); nothing was written. Remove or fix the link, or pick another --model-root"
            )


def _files_of(source: Source, listing: Listing, root: Path) -> list[RemoteFile]:
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


# The record of listings and checked files.


class Record:
    """`<root>/.cache/hyimage/downloads.json`: listings as read from the Hub, and files as checked."""

    def __init__(self, root: Path) -> None:
        self.path = root / RECORD_FILE
        self.listings: dict[str, dict] = {}
        self.files: dict[str, dict] = {}
        self.root = root
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self.listings = dict(data.get("listings", {}))
                self.files = dict(data.get("files", {}))
            except (OSError, ValueError, AttributeError, TypeError) as error:
                logger.warning(f"{self.path} is unreadable ({error}); it will be rebuilt")

    def listing(self, repo_id: str) -> Listing | None:
        entry = self.listings.get(repo_id)
        if entry is None:
            return None
        try:
            return _parse_listing(repo_id, entry["revision"], entry["files"], str(self.path))
        except (KeyError, TypeError, AttributeError, UnsafeListingError) as error:
            logger.warning(f"the listing of {repo_id} recorded in {self.path} is unusable ({error}); ignoring it")
            return None

    def set_listing(self, listing: Listing) -> None:
        self.listings[listing.repo_id] = {
            "revision": listing.revision,
            "files": {
                name: {"size": info.size, "sha256": info.sha256, "blob_id": info.blob_id}
                for name, info in listing.files.items()
            },
        }

    def _key(self, file: RemoteFile) -> str:
        return file.destination.relative_to(self.root).as_posix()

    def checked(self, file: RemoteFile) -> bool:
        """Whether `file` is on disk unchanged since its hash matched `file.hash_id`."""
        entry = self.files.get(self._key(file))
        if entry is None or entry.get("hash") != file.hash_id or not file.destination.is_file():
            return False
        stat = file.destination.stat()
        return stat.st_size == entry.get("size") == file.size and stat.st_mtime_ns == entry.get("mtime_ns")

    def mark_checked(self, file: RemoteFile) -> None:
        stat = file.destination.stat()
        self.files[self._key(file)] = {
            "repo_id": file.repo_id, "path": file.path, "size": stat.st_size,
            "hash": file.hash_id, "mtime_ns": stat.st_mtime_ns,
        }

    def forget(self, file: RemoteFile) -> None:
        self.files.pop(self._key(file), None)

    def save(self) -> None:
        data = {"version": 1, "listings": self.listings, "files": self.files}
        base, folder = self.root.resolve(), self.path.parent.resolve()
        if base not in folder.parents:
            logger.warning(f"{self.path.parent} resolves to {folder}, outside {base}: the download record is not kept")
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(data, indent=1, sort_keys=True))
            partial.replace(self.path)
        except OSError as error:
            logger.warning(f"could not write {self.path} ({error}): files will be hashed again next time")


# Listings from the Hub.


def _parse_listing(repo_id: str, revision: object, entries: object, origin: str) -> Listing:
    """Check a listing's shape; `entries` maps names to {size, sha256, blob_id}."""
    if not isinstance(revision, str) or COMMIT_RE.fullmatch(revision) is None:
        raise UnsafeListingError(f"the listing of {repo_id} from {origin} has no commit id (got {revision!r})")
    if not isinstance(entries, dict):
        raise UnsafeListingError(f"the listing of {repo_id} from {origin} has no file list")
    files = {}
    for name, entry in entries.items():
        if not isinstance(name, str):
            raise UnsafeListingError(f"the listing of {repo_id} from {origin} names a file {name!r}")
        check_name(name, repo_id)
        size, sha256, blob_id = entry.get("size"), entry.get("sha256"), entry.get("blob_id")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UnsafeListingError(f"the listing of {repo_id} from {origin} gives {name} the size {size!r}")
        if sha256 is not None and (not isinstance(sha256, str) or SHA256_RE.fullmatch(sha256) is None):
            raise UnsafeListingError(f"the listing of {repo_id} from {origin} gives {name} the sha256 {sha256!r}")
        if blob_id is not None and (not isinstance(blob_id, str) or COMMIT_RE.fullmatch(blob_id) is None):
            raise UnsafeListingError(f"the listing of {repo_id} from {origin} gives {name} the blob id {blob_id!r}")
        files[name] = FileInfo(size, sha256, None if sha256 else blob_id)
    return Listing(repo_id, revision, files)


def fetch_listing(repo_id: str, *, endpoint: str | None = None, token: str | None = None) -> Listing:
    """The repository's files with sizes and hashes, from the Hub (one API call)."""
    if offline_mode():
        raise OfflineError(f"HF_HUB_OFFLINE is set: the file list of {repo_id} cannot be asked of the Hub")
    url = hub_endpoint(endpoint)
    try:
        info = HfApi(endpoint=url, token=token).model_info(repo_id, files_metadata=True)
    except OfflineModeIsEnabled as error:
        raise OfflineError(f"HF_HUB_OFFLINE is set: the file list of {repo_id} cannot be asked of the Hub") from error
    except HfHubHTTPError as error:
        raise DownloadError(f"the Hub refused to list {repo_id}: {error}") from error
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise UnsafeListingError(
            f"the answer of {url} to the file listing of {repo_id} is not the Hub's JSON "
            f"({type(error).__name__}: {error}); an HTML page or a cut answer usually means a proxy, a captive "
            "portal or a wrong HF_ENDPOINT. Nothing was written; fix the endpoint and run the command again"
        ) from error
    except Exception as error:
        if _is_network_error(error):
            raise _unreachable(endpoint, error) from error
        raise
    entries = {}
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        size = lfs.size if lfs else sibling.size
        entries[sibling.rfilename] = {
            "size": size, "sha256": lfs.sha256 if lfs else None, "blob_id": sibling.blob_id,
        }
    return _parse_listing(repo_id, info.sha, entries, url)


def offline_mode() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) was set when huggingface_hub was imported."""
    return bool(constants.HF_HUB_OFFLINE)


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


# Planning: what is needed, what is there.


def plan(
    config: DownloadConfig,
    root: str | os.PathLike | None = None,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    online: bool = True,
    verify: bool = False,
) -> Plan:
    """What `config` needs below `root`; the Hub is asked only for listings not recorded there.

    `online=False` never asks it (as `HF_HUB_OFFLINE=1`): sources whose listing was never recorded are
    reported in `Plan.unknown`. An unreachable Hub is an error when `online` is True. `verify=True` counts
    every present file as unchecked (to be hashed again).
    """
    root = model_root(root)
    record = Record(root)
    result = Plan(root, config)
    if offline_mode():
        online, result.offline_reason = False, "HF_HUB_OFFLINE is set"
    elif not online:
        result.offline_reason = "offline"
    for source in sources(config):
        listing = record.listing(source.repo_id)
        if listing is None and online:
            listing = fetch_listing(source.repo_id, endpoint=endpoint, token=token)
            record.set_listing(listing)
        if listing is None:
            result.unknown.append(source)
            continue
        for file in _files_of(source, listing, root):
            result.files.append(file)
            if not file.present:
                result.missing.append(file)
            elif verify or not record.checked(file):
                result.unchecked.append(file)
    result.record = record  # listings read now are saved by `complete`, not by a dry run
    return result


# Downloading.


def download(
    config: DownloadConfig,
    root: str | os.PathLike | None = None,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    progress: bool = True,
    verify: bool = False,
) -> list[Path]:
    """Make `root` (default: the model root) hold what `config` needs, checked; returns the files put there.

    No network call when everything is recorded and present. `verify=True` hashes every present file again
    and replaces those that do not match.
    """
    found = plan(config, root, endpoint=endpoint, token=token, verify=verify)
    return complete(found, endpoint=endpoint, token=token, progress=progress)


def complete(
    found: Plan, *, endpoint: str | None = None, token: str | None = None, progress: bool = True
) -> list[Path]:
    """Check `found.unchecked`, then bring `found.missing` (and what failed its check) from the cache or the Hub."""
    record: Record = found.record
    if found.unknown:
        raise OfflineError(_offline_message(found, "the file lists of " + ", ".join(s.repo_id for s in found.unknown)
                                            + " were never recorded here, so what they hold cannot be known"))
    for file in found.missing:  # all checked before anything is written
        check_inside(found.root, file)
    missing = list(found.missing)
    for file in found.unchecked:
        if _hash_matches(file, file.destination, progress):
            record.mark_checked(file)
        else:
            check_inside(found.root, file)
            logger.warning(f"{file.destination} does not match its hash on the Hub: it is fetched again")
            record.forget(file)
            file.destination.unlink()
            missing.append(file)
    record.save()

    placed = []
    left = []
    for file in missing:
        if _from_hf_cache(file, progress):
            record.mark_checked(file)
            record.save()
            placed.append(file.destination)
        else:
            left.append(file)
    if not left:
        return placed
    if found.offline_reason or offline_mode():
        raise OfflineError(_offline_message(found, f"{len(left)} files ({human_size(sum(f.size for f in left))}) "
                                            "are missing: " + ", ".join(str(f.destination) for f in left)))
    overall = tqdm(
        total=sum(f.size for f in left), unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
        desc=f"{len(left)} files", disable=True if not progress else None,
    )
    with overall:
        bar_class = _file_bar_class(overall, progress)
        for file in left:
            _fetch(file, endpoint=endpoint, token=token, bar_class=bar_class)
            if not _hash_matches(file, file.destination, progress):
                file.destination.unlink()
                raise DownloadError(
                    f"{file.path} from {file.repo_id} arrived corrupt (its hash differs from the listing's "
                    f"{file.hash_id}); it was deleted, run the command again"
                )
            record.mark_checked(file)
            record.save()
            placed.append(file.destination)
            logger.info(f"fetched {file.destination} ({human_size(file.size)})")
    return placed


def _offline_message(found: Plan, what: str) -> str:
    reason = found.offline_reason or "offline"
    unset = "unset HF_HUB_OFFLINE and " if "HF_HUB_OFFLINE" in reason else ""
    return (
        f"{reason}, so the Hub is not asked, and {what}. To complete {found.root}, {unset}run "
        f"`{found.config.command(found.root)}` where the Hub (or the mirror in HF_ENDPOINT) is reachable"
    )


def _file_bar_class(overall: tqdm, progress: bool) -> type:
    """huggingface_hub's per-file bar, which also advances the overall bar (and stays hidden when `progress` is off).

    Xet transfers open a second bar per file for the bytes on the wire (named `*.transfer`); only the file's
    own bytes count towards the overall bar.
    """

    class FileBar(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if not progress:
                kwargs["disable"] = True
            kwargs.setdefault("leave", False)
            kwargs.setdefault("file", sys.stderr)
            self.counts = not str(kwargs.get("name") or "").endswith(".transfer")
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self.counts:
                overall.update(n)
            return super().update(n)

    return FileBar


def _fetch(file: RemoteFile, *, endpoint: str | None, token: str | None, bar_class: type) -> None:
    """One file at the listing's commit, through huggingface_hub into the layout."""
    if file.destination.is_symlink() or file.destination.exists():
        file.destination.unlink()  # a stale or damaged copy (or a link): huggingface_hub would keep it
    # `_from_hf_cache` already looked in the Hugging Face cache, with a hash check; the cache_dir given here is
    # never created, so that huggingface_hub does not copy a cached file over without one
    no_cache = file.local_dir / ".cache" / "hyimage" / "hf-cache-already-searched"
    # recent huggingface_hub versions take a bar class in hf_hub_download; older ones show their own bars
    bars = {"tqdm_class": bar_class} if "tqdm_class" in inspect.signature(hf_hub_download).parameters else {}
    try:
        hf_hub_download(
            file.repo_id, file.path, revision=file.revision, local_dir=file.local_dir, cache_dir=no_cache,
            endpoint=endpoint, token=token, **bars,
        )
    except OfflineModeIsEnabled as error:
        raise OfflineError(f"HF_HUB_OFFLINE is set: {file.path} of {file.repo_id} cannot be fetched") from error
    except HfHubHTTPError as error:
        raise DownloadError(f"the Hub refused {file.path} of {file.repo_id}: {error}") from error
    except ValueError as error:  # huggingface_hub's own refusal of an unsafe name
        raise UnsafeListingError(f"{file.path} of {file.repo_id}: {error}") from error
    except Exception as error:
        if _is_network_error(error):
            raise DownloadError(
                f"the transfer of {file.path} from {file.repo_id} failed after huggingface_hub's retries "
                f"({type(error).__name__}: {error}); run the command again to resume"
            ) from error
        raise
    if not file.destination.is_file() or file.destination.stat().st_size != file.size:
        size = file.destination.stat().st_size if file.destination.is_file() else 0
        raise DownloadError(
            f"{file.path} from {file.repo_id} arrived with {size} bytes instead of {file.size}; "
            "run the command again"
        )


def _from_hf_cache(file: RemoteFile, progress: bool) -> bool:
    """Hard-link (else copy) the same content from the Hugging Face cache; False when it is not there intact."""
    repo_cache = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=file.repo_id, repo_type="model")
    candidates = [repo_cache / "blobs" / etag for etag in (file.sha256, file.blob_id) if etag]
    cached = try_to_load_from_cache(file.repo_id, file.path, revision=file.revision)
    if isinstance(cached, str):
        candidates.append(Path(cached))
    for candidate in candidates:
        if not candidate.is_file() or candidate.stat().st_size != file.size:
            continue
        source = candidate.resolve()
        file.destination.parent.mkdir(parents=True, exist_ok=True)
        partial = file.destination.with_name(file.destination.name + f".{os.getpid()}.from-cache")
        partial.unlink(missing_ok=True)
        try:
            os.link(source, partial)
            how = "linked"
        except OSError:
            shutil.copyfile(source, partial)
            how = "copied"
        if _hash_matches(file, partial, progress):
            partial.replace(file.destination)
            logger.info(f"{how} {file.destination} from the Hugging Face cache ({source})")
            return True
        partial.unlink()
        logger.warning(f"{source} in the Hugging Face cache does not match the hash of {file.path}; not used")
    return False


# Hashing.


def _hash_matches(file: RemoteFile, path: Path, progress: bool) -> bool:
    """Whether `path` has the size and hash the listing gives `file` (nothing known: the size alone)."""
    size = path.stat().st_size
    if size != file.size:
        return False
    if file.sha256 is not None:
        return hash_file(path, hashlib.sha256(), progress=progress) == file.sha256
    if file.blob_id is not None:
        return hash_file(path, hashlib.sha1(f"blob {size}\0".encode()), progress=progress) == file.blob_id
    return True


def hash_file(path: Path, digest: Any, *, progress: bool = True) -> str:
    """The hex digest of `path`, with a bar in bytes on stderr."""
    bar = tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
        desc=f"hashing {path.name}", leave=False, disable=True if not progress else None,
    )
    with bar, open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def check_present(config: DownloadConfig, root: str | os.PathLike | None = None, *, progress: bool = True) -> None:
    """Before loading: hash again each needed file whose hash is known but that changed since it was checked.

    Needs no network: only listings recorded below `root` are used; files without one are left to the loader.
    """
    found = plan(config, root, online=False)
    if not found.unchecked:
        return
    for file in found.unchecked:
        if not _hash_matches(file, file.destination, progress):
            raise DownloadError(
                f"{file.destination} changed since it was downloaded and no longer matches its hash on the Hub "
                f"({file.hash_id}); fetch it again with `{config.command(found.root)} --verify`, or, if you "
                f"replaced it on purpose, delete {found.record.path} so that the download record is forgotten"
            )
        found.record.mark_checked(file)
    found.record.save()


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


def describe_unknown(unknown: Iterable[Source]) -> list[str]:
    """What is known offline of sources whose listing was never recorded: the names and patterns, not the sizes."""
    return [f"{s.repo_id} -> {s.local_dir or '.'}/: {', '.join(s.patterns)}" for s in unknown]
