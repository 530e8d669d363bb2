"""Make the model root hold exactly what one configuration needs, checked, in the official `ckpts/` layout.

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
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub.utils import tqdm as hf_tqdm
from loguru import logger
from tqdm.auto import tqdm

from hyimage.checkpoints.hub import cached_copies, fetch_file, fetch_listing, offline_mode
from hyimage.checkpoints.layout import model_root
from hyimage.checkpoints.needs import DownloadConfig, RemoteFile, Source, files_of, sources
from hyimage.checkpoints.record import Record
from hyimage.errors import DownloadError, OfflineError, UnsafeListingError

CHUNK_BYTES = 8 * 1024 * 1024


@dataclass
class DownloadPlan:
    """What a configuration needs below a root, and what of it is missing or not yet checked."""

    root: Path
    config: DownloadConfig
    files: list[RemoteFile] = field(default_factory=list)
    missing: list[RemoteFile] = field(default_factory=list)
    unchecked: list[RemoteFile] = field(default_factory=list)  # present, not yet hashed (or changed since)
    unknown: list[Source] = field(default_factory=list)  # sources whose listing is not known here
    offline_reason: str | None = None  # why the Hub was not asked, when it was not
    record: Record | None = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unchecked and not self.unknown

    def fetch_bytes(self) -> int:
        return sum(f.size for f in self.missing)


def check_inside(root: Path, file: RemoteFile) -> None:
    """Refuse to write `file` unless its folder (and huggingface_hub's `.cache` beside it) resolve inside `root`."""
    base = root.resolve()
    for folder in (file.destination.parent, file.local_dir / ".cache"):
        resolved = folder.resolve()
        if resolved != base and base not in resolved.parents:
            raise UnsafeListingError(
                f"{file.destination} would be written below {resolved}, outside the model root {base} (a symlink "
                "points out of it); nothing was written. Remove or fix the link, or pick another --model-root"
            )


# Planning: what is needed, what is there.


def plan_download(
    config: DownloadConfig,
    root: str | os.PathLike | None = None,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    online: bool = True,
    verify: bool = False,
) -> DownloadPlan:
    """What `config` needs below `root`; the Hub is asked only for listings not recorded there.

    `online=False` never asks it (as `HF_HUB_OFFLINE=1`): sources whose listing was never recorded are
    reported in `DownloadPlan.unknown`. An unreachable Hub is an error when `online` is True. `verify=True`
    counts every present file as unchecked (to be hashed again).
    """
    root = model_root(root)
    record = Record(root)
    result = DownloadPlan(root, config)
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
        for file in files_of(source, listing, root):
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
    found = plan_download(config, root, endpoint=endpoint, token=token, verify=verify)
    return complete(found, endpoint=endpoint, token=token, progress=progress)


def complete(
    found: DownloadPlan, *, endpoint: str | None = None, token: str | None = None, progress: bool = True
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


def _offline_message(found: DownloadPlan, what: str) -> str:
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
    fetch_file(
        file.repo_id, file.path, file.revision, file.local_dir, cache_dir=no_cache, endpoint=endpoint, token=token,
        bar_class=bar_class,
    )
    if not file.destination.is_file() or file.destination.stat().st_size != file.size:
        size = file.destination.stat().st_size if file.destination.is_file() else 0
        raise DownloadError(
            f"{file.path} from {file.repo_id} arrived with {size} bytes instead of {file.size}; "
            "run the command again"
        )


def _from_hf_cache(file: RemoteFile, progress: bool) -> bool:
    """Hard-link (else copy) the same content from the Hugging Face cache; False when it is not there intact."""
    for candidate in cached_copies(file.repo_id, file.path, file.revision, (file.sha256, file.blob_id)):
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
    found = plan_download(config, root, online=False)
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
