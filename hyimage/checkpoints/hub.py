"""The Hugging Face Hub through huggingface_hub: repository listings, one file's transfer, cached copies.

Also what the download side raises (`DownloadError` and its kinds), offline mode and the endpoint. Every call
to the Hub goes through here, and its failures become those errors, each saying what to do.
"""

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.file_download import repo_folder_name, try_to_load_from_cache

from hyimage.errors import DownloadError, HubUnreachableError, OfflineError, UnsafeListingError

NETWORK_ERROR_MODULES = ("httpx", "httpx2", "requests", "urllib3")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_repo_id(name: str) -> bool:
    """'owner/name' as the Hub spells repository ids."""
    return isinstance(name, str) and REPO_ID_RE.fullmatch(name) is not None and ".." not in name


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


def parse_listing(repo_id: str, revision: object, entries: object, origin: str) -> Listing:
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
        if is_network_error(error):
            raise _unreachable(endpoint, error) from error
        raise
    entries = {}
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        size = lfs.size if lfs else sibling.size
        entries[sibling.rfilename] = {
            "size": size, "sha256": lfs.sha256 if lfs else None, "blob_id": sibling.blob_id,
        }
    return parse_listing(repo_id, info.sha, entries, url)


def fetch_file(
    repo_id: str, path: str, revision: str, local_dir: Path, *, cache_dir: Path, endpoint: str | None,
    token: str | None, bar_class: type,
) -> None:
    """`path` of `repo_id` at `revision` into `local_dir` with `hf_hub_download`; its failures as DownloadErrors."""
    # recent huggingface_hub versions take a bar class in hf_hub_download; older ones show their own bars
    bars = {"tqdm_class": bar_class} if "tqdm_class" in inspect.signature(hf_hub_download).parameters else {}
    try:
        hf_hub_download(
            repo_id, path, revision=revision, local_dir=local_dir, cache_dir=cache_dir,
            endpoint=endpoint, token=token, **bars,
        )
    except OfflineModeIsEnabled as error:
        raise OfflineError(f"HF_HUB_OFFLINE is set: {path} of {repo_id} cannot be fetched") from error
    except HfHubHTTPError as error:
        raise DownloadError(f"the Hub refused {path} of {repo_id}: {error}") from error
    except ValueError as error:  # huggingface_hub's own refusal of an unsafe name
        raise UnsafeListingError(f"{path} of {repo_id}: {error}") from error
    except Exception as error:
        if is_network_error(error):
            raise DownloadError(
                f"the transfer of {path} from {repo_id} failed after huggingface_hub's retries "
                f"({type(error).__name__}: {error}); run the command again to resume"
            ) from error
        raise


def cached_copies(repo_id: str, path: str, revision: str, etags: tuple[str | None, ...]) -> list[Path]:
    """Where the Hugging Face cache may hold `path` of `repo_id`: its blobs named by `etags`, then the snapshot."""
    repo_cache = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    candidates = [repo_cache / "blobs" / etag for etag in etags if etag]
    cached = try_to_load_from_cache(repo_id, path, revision=revision)
    if isinstance(cached, str):
        candidates.append(Path(cached))
    return candidates


def offline_mode() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) was set when huggingface_hub was imported."""
    return bool(constants.HF_HUB_OFFLINE)


def is_network_error(error: Exception) -> bool:
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
