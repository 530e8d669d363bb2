"""The download record: the listings read from the Hub and the files checked (why it is ours: see `download`)."""

import json
import os
from pathlib import Path

from loguru import logger

from hyimage.checkpoints.hub import Listing, parse_listing
from hyimage.checkpoints.needs import RemoteFile
from hyimage.errors import UnsafeListingError

RECORD_FILE = Path(".cache") / "hyimage" / "downloads.json"


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
            return parse_listing(repo_id, entry["revision"], entry["files"], str(self.path))
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
