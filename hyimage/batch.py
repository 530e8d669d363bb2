"""`hyimage batch PROMPTS.jsonl --out DIR`: many images, resumable, alone or across ranks under torchrun.

Each non-blank line of PROMPTS.jsonl is one JSON object: `prompt` and optionally `negative_prompt`, `seed`,
`width`, `height`, `steps`, `guidance_scale`, `name`. Every line is checked before anything loads. Line n
(1-based, blank lines counted) becomes `DIR/<name>.png`, else `DIR/<nnnnn>.png`; its seed is the line's, else
`--seed + n - 1`, else drawn at random, and is always recorded. Each image is written to a temporary file in
DIR and renamed into place, then one JSON line is appended to `DIR/results.jsonl`. A rerun skips the lines
recorded there whose file exists, and deletes the temporary files an interrupted run left behind; `--overwrite`
starts `results.jsonl` afresh and redoes every line.

Under torchrun the lines still to do are dealt round-robin to the data-parallel groups (every rank, or with
`--parallel cfg=C,sp=S` every C x S ranks, which then draw each image together). Each image is one pipeline
call with its own seed, so it does not depend on how many ranks ran the job. `DIR` must be one folder that
every rank sees (a shared file system across nodes): ranks append to `results.jsonl` under an exclusive lock.

Hostile or damaged folders: every file the job writes is created inside DIR without following a symbolic link
(`O_NOFOLLOW`; images are renamed over whatever is at their name, never written through it). A line of
results.jsonl that is not JSON or not UTF-8 is skipped with a warning naming the file and line, and its image
is drawn again. Names are checked against the file system's limit (NAME_MAX, 255 bytes with `.png`) before
anything runs. One job at a time per folder: the job's first rank holds an exclusive `flock` on DIR itself for
the whole job (no lock file is left behind, and a killed job's lock goes with its process); a second job on the
same folder refuses to start while the first holds it, so no line is drawn or recorded twice. (On a network
file system without `flock` support the lock cannot be taken: the job warns and runs without it.)
"""

import argparse
import errno
import fcntl
import json
import math
import os
import random
import signal
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from hyimage.diffusion.pipelines.parts import to_uint8
from hyimage.diffusion.pipelines.sizes import resolve_size
from hyimage.diffusion.request import check_request, closest_name
from hyimage.errors import RequestError
from hyimage.metadata import png_text

LINE_KEYS = ("prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "name")
RESULTS = "results.jsonl"
PARTIAL_SUFFIX = ".partial.png"
PARTIAL_PREFIX = ".batch-"
SIZE_FACTOR = 32
NAME_MAX = 255
"""The longest file name in bytes on Linux file systems (ext4, xfs, btrfs, tmpfs): `<name>.png` must fit."""
JOB_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance_scale", "shift": "shift (--shift)",
             "seed": "seed", "width": "width", "height": "height"}


@dataclass(frozen=True)
class BatchLine:
    """One validated line of the prompts file; None where the line leaves the value to the command's options."""

    line: int
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    name: str | None = None

    @property
    def file(self) -> str:
        return f"{self.name}.png" if self.name is not None else f"{self.line:05d}.png"


@dataclass(frozen=True)
class BatchJob:
    """A line with every setting resolved: what one pipeline call draws and what results.jsonl records."""

    line: int
    file: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    shift: float


# Reading and checking the prompts file.
def read_prompts(path: Path) -> list[BatchLine]:
    """Every non-blank line of `path` as a BatchLine; the first bad line is refused with its number."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found; pass a .jsonl file with one JSON object per line")
    lines: list[BatchLine] = []
    files: dict[str, int] = {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8").removeprefix("\ufeff" if number == 1 else "")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}, line {number} is not UTF-8 text (byte {error.start + 1} of the line is "
                    f"0x{raw[error.start]:02x}); save the prompts file as UTF-8"
                ) from None
            if not text.strip():
                continue
            entry = parse_line(text, number, path)
            if entry.file in files:
                raise ValueError(
                    f"{path}, line {number}: its image {entry.file} is also line {files[entry.file]}'s; "
                    "give one of them another `name`"
                )
            files[entry.file] = number
            lines.append(entry)
    if not lines:
        raise ValueError(f"{path} holds no prompts; write one JSON object per line, e.g. {{\"prompt\": \"a red fox\"}}")
    return lines


def parse_line(text: str, number: int, path: Path) -> BatchLine:
    """One line of the prompts file, checked key by key."""
    where = f"{path}, line {number}"
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error.msg}); each line is one JSON object") from error
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not a JSON object; write {{\"prompt\": \"...\"}}")
    unknown = sorted(set(entry) - set(LINE_KEYS))
    if unknown:
        named = [f"{k!r} (did you mean {c!r}?)" if (c := closest_name(k, LINE_KEYS)) else repr(k) for k in unknown]
        raise ValueError(f"{where}: unknown key {', '.join(named)}; the keys are {', '.join(LINE_KEYS)}")
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: `prompt` must be a non-empty string")
    if not isinstance(entry.get("negative_prompt", ""), str):
        raise ValueError(f"{where}: `negative_prompt` must be a string")
    for key in ("prompt", "negative_prompt", "name"):
        if isinstance(entry.get(key), str) and not _is_unicode(entry[key]):
            raise ValueError(f"{where}: `{key}` holds an unpaired surrogate escape (\\ud800-\\udfff), which is no "
                             "character; write the text itself")
    for key, low in (("seed", 0), ("steps", 1), ("width", SIZE_FACTOR), ("height", SIZE_FACTOR)):
        value = entry.get(key)
        if value is not None and (not _is_int(value) or value < low or value >= 2**63):
            raise ValueError(f"{where}: `{key}` must be an integer of at least {low}, got {value!r}")
    for key in ("width", "height"):
        if entry.get(key) is not None and entry[key] % SIZE_FACTOR:
            raise ValueError(
                f"{where}: `{key}`={entry[key]} must be a multiple of {SIZE_FACTOR}, "
                f"e.g. {max(SIZE_FACTOR, round(entry[key] / SIZE_FACTOR) * SIZE_FACTOR)}"
            )
    scale = entry.get("guidance_scale")
    is_number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if scale is not None and (not is_number or not math.isfinite(scale)):
        raise ValueError(f"{where}: `guidance_scale` must be a number, got {scale!r}")
    name = entry.get("name")
    if name is not None:
        check_name(name, where)
    return BatchLine(
        line=number,
        prompt=prompt,
        negative_prompt=entry.get("negative_prompt"),
        seed=entry.get("seed"),
        width=entry.get("width"),
        height=entry.get("height"),
        steps=entry.get("steps"),
        guidance_scale=None if scale is None else float(scale),
        name=name,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_unicode(text: str) -> bool:
    """`text` can be written as UTF-8 (JSON's `\\ud800` escapes decode to lone surrogates, which cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_name(name: Any, where: str) -> None:
    """A plain file stem: no folders, no `..`, no leading dot (temporary files start with one)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: `name` must be a non-empty string (the file stem)")
    if "/" in name or "\\" in name or ".." in name or name.startswith(".") or any(ord(c) < 32 for c in name):
        raise ValueError(
            f"{where}: `name` {name!r} must be a plain file stem (no '/', '\\', '..', leading '.' or control "
            "characters); the image goes to DIR/<name>.png"
        )
    if name.lower().endswith(".png"):
        raise ValueError(f"{where}: `name` {name!r} is a stem; leave out .png (it is added)")
    size = len(f"{name}.png".encode("utf-8", "surrogatepass"))
    if size > NAME_MAX:
        raise ValueError(
            f"{where}: `name` is too long for a file name: {name[:24]!r}... with .png is {size} bytes, and file "
            f"systems allow {NAME_MAX} (NAME_MAX); shorten it to at most {NAME_MAX - 4} bytes"
        )


# Settings of each line.
def resolve_jobs(
    lines: list[BatchLine],
    args: argparse.Namespace,
    defaults: Any,
    rng: random.Random | None = None,
    source: str | os.PathLike = "the prompts file",
) -> list[BatchJob]:
    """Each line's settings: the line's own, else the command's options, else the variant's defaults; each job
    checked as the pipeline will check it (a bad value names `source` and the line, before anything loads)."""
    rng = rng or random.SystemRandom()
    default_size = resolve_size(args.width, args.height, args.aspect_ratio, SIZE_FACTOR)
    jobs = []
    for entry in lines:
        if entry.seed is not None:
            seed = entry.seed
        elif args.seed is not None:
            seed = args.seed + entry.line - 1
        else:
            seed = rng.randrange(2**31)
        jobs.append(
            BatchJob(
                line=entry.line,
                file=entry.file,
                prompt=entry.prompt,
                negative_prompt=_first(entry.negative_prompt, args.negative_prompt, ""),
                seed=seed,
                width=entry.width if entry.width is not None else default_size[0],
                height=entry.height if entry.height is not None else default_size[1],
                steps=_first(entry.steps, args.steps, defaults.num_inference_steps),
                guidance_scale=_first(entry.guidance_scale, args.guidance_scale, defaults.guidance_scale),
                shift=_first(args.shift, defaults.shift),
            )
        )
        check_job(jobs[-1], source)
    return jobs


def check_job(job: BatchJob, source: str | os.PathLike) -> None:
    """The pipeline's request check on one job's resolved settings, naming the line (its value or the option's)."""
    try:
        check_request(
            {"prompt": job.prompt, "width": job.width, "height": job.height, "num_inference_steps": job.steps,
             "guidance_scale": job.guidance_scale, "shift": job.shift, "seed": job.seed},
            size_multiple=SIZE_FACTOR, names={key: f"`{name}`" for key, name in JOB_NAMES.items()},
        )
    except RequestError as error:
        raise ValueError(f"{source}, line {job.line}: {error} (the line's value, else the option's)") from None


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


# What is done already.
def read_results(out: Path) -> dict[str, dict]:
    """The records of results.jsonl by file name (the last record wins). A line that is not UTF-8, not JSON or no
    record is skipped with a warning naming it (its image is drawn again); an unfinished last line is expected."""
    path = out / RESULTS
    records: dict[str, dict] = {}
    data = _read_inside(out, RESULTS)
    if data is None:
        return records
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            unfinished = number == len(lines)  # no newline after it: a run was killed while writing it
            reason = "unfinished (a run stopped while writing it)" if unfinished else f"damaged ({error})"
            logger.warning(f"{path}, line {number} is {reason}; skipped: its image is drawn again if it is missing")
            continue
        if isinstance(record, dict) and isinstance(record.get("file"), str):
            records[record["file"]] = record
        else:
            logger.warning(f"{path}, line {number} is not a record of an image; skipped")
    return records


def is_complete(out: Path, entry: BatchLine, records: dict[str, dict]) -> bool:
    """Recorded in results.jsonl and on disk as a regular file (not a link)."""
    try:
        return entry.file in records and stat.S_ISREG(os.lstat(out / entry.file).st_mode)
    except OSError:
        return False


def remove_partial_files(out: Path) -> list[Path]:
    """Delete the temporary files an interrupted run left in `out` (call while holding `lock_job_folder`)."""
    removed = sorted(out.glob(f".*{PARTIAL_SUFFIX}"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


# Writing.
def write_png_atomic(pixels: Any, path: Path, settings: dict) -> None:
    """An image tensor (3, H, W) or (1, 3, H, W) in [0, 1] as a PNG with `settings` in its text chunks, written
    to a temporary file in the same folder, flushed to disk and renamed into place."""
    info = PngImagePlugin.PngInfo()
    for key, text in png_text(settings).items():
        info.add_text(key, text)
    array = to_uint8(pixels if pixels.ndim == 4 else pixels.unsqueeze(0))[0]
    # mkstemp creates a new file (O_CREAT | O_EXCL | O_NOFOLLOW) with a short name whatever the image's name;
    # the rename then replaces whatever is at `path` (a link included) instead of writing through it
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as file:
            Image.fromarray(array).save(file, format="PNG", pnginfo=info)
            file.flush()
            os.fchmod(file.fileno(), 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and not error.filename:  # a full disk or a file-size limit names no file
            error.filename = str(path)
        raise
    _fsync_dir(path.parent)


def append_result(out: Path, record: dict) -> None:
    """Append one JSON line to results.jsonl under an exclusive lock (ranks share the file)."""
    data = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode()
    descriptor = open_inside(out, RESULTS, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        size = os.fstat(descriptor).st_size
        if size and os.pread(descriptor, 1, size - 1) != b"\n":
            data = b"\n" + data  # a run killed mid-line left half a record: start on a fresh line
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def open_inside(out: Path, name: str, flags: int) -> int:
    """A descriptor of the file `name` directly inside `out`, never through a symbolic link at that name."""
    try:
        return os.open(out / name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FileExistsError(
                f"{out / name} is a symbolic link; hyimage batch writes only files inside --out and follows no "
                "link there: remove the link (or choose another --out)"
            ) from None
        raise


def _read_inside(out: Path, name: str) -> bytes | None:
    """The bytes of `name` inside `out` read without following a link, or None when there is no such file."""
    try:
        descriptor = open_inside(out, name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(descriptor, "rb") as file:
        return file.read()


@contextmanager
def lock_job_folder(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder `out` for one job; refuse at once when another job holds it."""
    descriptor = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(
                f"another hyimage batch job is drawing into --out {out} (it holds the folder's lock); wait for it "
                "to finish, or pass another --out"
            ) from None
        except OSError as error:
            logger.warning(f"cannot lock {out} ({error.strerror}); run one job at a time on this folder")
        yield
    finally:
        os.close(descriptor)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def count_records(out: Path) -> int:
    data = _read_inside(out, RESULTS)
    return 0 if data is None else data.count(b"\n")


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (what torchrun sends the other ranks when one fails) ends the job through `finally` blocks, so the
    temporary file being written is removed."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class JobProgress:
    """A progress bar over the whole job on the first rank, advanced by the records every rank appends."""

    def __init__(self, out: Path, total: int, done: int, enabled: bool) -> None:
        self.out = out
        self.baseline = count_records(out)
        self.done = done
        self.bar = tqdm(total=total, initial=done, desc="batch", unit="image", disable=not enabled)

    def refresh(self, *_: Any) -> None:
        """Also a per-step pipeline callback (returns None: the latents stay as they are)."""
        if self.bar.disable:
            return
        self.bar.n = min(self.bar.total, self.done + count_records(self.out) - self.baseline)
        self.bar.refresh()

    def close(self) -> None:
        self.refresh()
        self.bar.close()
