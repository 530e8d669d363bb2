"""What a checkpoint file is, read from its first bytes and its header, checked before any tensor is read.

`checkpoint_format` sniffs the content (safetensors, GGUF, a torch zip, a pickle) whatever the suffix says;
`read_tensor_infos` parses a safetensors header (8-byte little-endian length, JSON, then the data) and checks
every entry's dtype, shape and byte range against the file's size. Any defect raises CheckpointError naming the
file.
"""

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from hyimage.errors import CheckpointError

PathLike = str | os.PathLike
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


KNOWN_SAFETENSORS_DTYPES = frozenset(
    "BOOL F4 F6_E2M3 F6_E3M2 U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 F8_E4M3FNUZ F8_E5M2FNUZ "
    "I16 U16 F16 BF16 I32 U32 F32 C64 F64 I64 U64".split()
)
"""Every dtype name the safetensors library (0.8) knows; SAFETENSORS_DTYPES are those hyimage reads."""


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit


GGUF_MAGIC = b"GGUF"


ZIP_MAGIC = b"PK\x03\x04"


PICKLE_PROTO = 0x80


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, and where its bytes lie in the file."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in FLOAT8_DTYPES


def damaged_file(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is incomplete or damaged ({problem}); the download was probably interrupted: "
        "delete the file and download it again"
    )


def _invalid(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file ({problem}); the safetensors library refuses it too. "
        "Download the file again, or rewrite it with safetensors.torch.save_file from a trusted copy"
    )


def regular_file_size(path: Path, what: str = "checkpoint file") -> int:
    """The size of `path`, which must be a regular file (a symbolic link to one will do); else a clear error."""
    try:
        status = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise FileNotFoundError(
                f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                "fix the link or download the file again"
            ) from None
        raise FileNotFoundError(f"{what} {path} does not exist; check the path or download it") from None
    except OSError as error:
        raise CheckpointError(f"{what} {path} cannot be opened ({error.strerror or error}); check the path") from None
    if stat.S_ISDIR(status.st_mode):
        raise CheckpointError(f"{what} {path} is a folder, not a file; pass the file itself")
    if not stat.S_ISREG(status.st_mode):
        raise CheckpointError(
            f"{what} {path} is not a regular file (a pipe, socket or device); pass the checkpoint file itself"
        )
    return status.st_size


def checkpoint_format(path: PathLike) -> str:
    """What a checkpoint file is, from its first bytes: "safetensors", "gguf", "torch-zip", "pickle" or "unknown".

    The place to branch on a file format before reading it (the loaders call `read_tensor_infos`, which
    refuses anything but safetensors with a message saying what the file is).
    """
    path = Path(path)
    regular_file_size(path)
    with open(path, "rb") as file:
        head = file.read(16)
    if head.startswith(GGUF_MAGIC):
        return "gguf"
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if len(head) >= 2 and head[0] == PICKLE_PROTO and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) > 8 and head[8:9] in (b"{", b" "):
        return "safetensors"
    return "unknown"


def _not_safetensors(path: Path, kind: str) -> CheckpointError:
    if kind == "gguf":
        return CheckpointError(
            f"{path} is a GGUF file (a llama.cpp-style quantized checkpoint), not a safetensors file: only the DiT "
            "is read from GGUF (HYImageDiffusionTransformer.from_single_file); pass a safetensors file here"
        )
    return CheckpointError(
        f"{path} is a PyTorch pickle checkpoint (torch.save), not a safetensors file; hyimage reads DiT and "
        "text-encoder weights from safetensors only: pass the released .safetensors file, or convert this one "
        "from a trusted copy with safetensors.torch.save_file(torch.load(path, weights_only=True), 'out.safetensors')"
    )


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object as a dict, refusing a key given twice (json would keep the last one silently)."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def _is_count(value: object) -> bool:
    """A JSON integer in [0, 2^64) (the library's usize; booleans are not integers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _parse_entry(path: Path, key: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _invalid(path, f"header entry {key!r} is a JSON {type(entry).__name__}, not an object")
    missing = [field for field in ("dtype", "shape", "data_offsets") if field not in entry]
    if missing:
        raise _invalid(path, f"header entry {key!r} lacks {', '.join(missing)}")
    stored, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(stored, str) or stored not in KNOWN_SAFETENSORS_DTYPES:
        raise _invalid(path, f"tensor {key!r} has dtype {stored!r}, which is not a safetensors dtype")
    if stored not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {stored}, which hyimage does not read")
    if not isinstance(shape, list) or not all(_is_count(size) for size in shape):
        raise _invalid(path, f"tensor {key!r} has shape {shape!r}; a shape is a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(offset) for offset in offsets):
        raise _invalid(
            path, f"tensor {key!r} has data_offsets {offsets!r}; they are two non-negative integers [begin, end]"
        )
    begin, end = offsets
    if end < begin:
        raise _invalid(path, f"tensor {key!r} has data_offsets [{begin}, {end}], which end before they begin")
    dtype = SAFETENSORS_DTYPES[stored]
    needed = math.prod(shape) * dtype.itemsize
    if end - begin != needed:
        raise _invalid(path, f"tensor {key!r} spans {end - begin} bytes, but {stored} {shape} needs {needed}")
    return TensorInfo(tuple(shape), dtype, data_start + begin)


def _check_layout(path: Path, infos: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The tensors' bytes, sorted by offset, tile the data exactly: from its first byte to the end of the file."""
    position, previous = data_start, None
    for key, info in sorted(infos.items(), key=lambda item: (item[1].offset, item[1].nbytes)):
        begin = info.offset - data_start
        if info.offset < position:
            raise _invalid(
                path, f"tensor {key!r} begins at data byte {begin}, inside {previous!r}, which ends at "
                f"{position - data_start}: the tensors overlap"
            )
        if info.offset > position:
            after = f"after {previous!r} ends" if previous is not None else "from the start of the data"
            gap = begin - (position - data_start)
            raise _invalid(path, f"{gap} bytes {after} belong to no tensor (before {key!r})")
        position, previous = info.offset + info.nbytes, key
    if position > size:
        raise damaged_file(path, f"the header describes {position} bytes, the file has only {size}")
    if position < size:
        raise _invalid(path, f"{size - position} bytes after the last tensor's data belong to no tensor")


def read_tensor_infos(path: PathLike) -> dict[str, TensorInfo]:
    """Every tensor's shape, dtype and offset from the header of `path`.

    Checked as strictly as the safetensors library checks a file (its `Metadata::validate`): field types,
    known dtypes, byte counts that fit shape and dtype, and offsets that tile the data without gap or overlap
    from its first byte to the end of the file. Any defect raises CheckpointError naming the file.
    """
    path = Path(path)
    size = regular_file_size(path)
    kind = checkpoint_format(path)
    if kind in ("gguf", "torch-zip", "pickle"):
        raise _not_safetensors(path, kind)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise damaged_file(path, f"{size} bytes, shorter than a safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > MAX_HEADER_BYTES:
            raise _invalid(path, f"the header claims {header_size} bytes, more than the {MAX_HEADER_BYTES} allowed")
        if 8 + header_size > size:
            raise damaged_file(path, f"the header claims {header_size} bytes, the file has {size}")
        try:
            header = json.loads(file.read(header_size).decode("utf-8"), object_pairs_hook=_unique_keys)
        except UnicodeDecodeError:
            raise _invalid(path, "the header is not UTF-8 text; is it a safetensors file?") from None
        except json.JSONDecodeError as error:
            raise _invalid(path, f"the header is not valid JSON: {error}") from None
        except ValueError as error:
            raise _invalid(path, f"in the header, {error}") from None
    if not isinstance(header, dict):
        raise _invalid(path, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())
    ):
        raise _invalid(path, "__metadata__ must map names to strings")
    data_start = 8 + header_size
    infos = {key: _parse_entry(path, key, entry, data_start) for key, entry in header.items()}
    _check_layout(path, infos, data_start, size)
    return infos


def read_weight_map(index: PathLike) -> dict[str, Path]:
    """Each tensor name of a sharded checkpoint's `*.safetensors.index.json`, with the shard holding it."""
    index = Path(index)
    regular_file_size(index, "checkpoint index")
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{index} is not valid JSON ({error}); download it again") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index} has no 'weight_map' object (tensor name -> shard file); it is not a checkpoint index: "
            "download it again"
        )
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(
                f"{index}: the shard of {key!r} is {name!r}, not a file name in the same folder; download it again"
            )
    return {key: index.parent / name for key, name in weight_map.items()}
