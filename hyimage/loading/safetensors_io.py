"""Stream tensors from safetensors files into a model built on the `meta` device.

Tensors are read one at a time straight from the file into fresh memory, converted to the
requested dtype on the requested device and assigned in place of the meta placeholders, so host
memory holds the model plus one tensor in flight, never a second copy of the checkpoint.

The header is parsed here (8-byte little-endian length, JSON, then the data) and each tensor is
read with `readinto`: `safe_open(framework="pt")` of safetensors 0.8 maps the whole file
copy-on-write, which the kernel refuses (ENOMEM) for a 35 GB DiT on a machine with less RAM.
"""

import json
import math
import os
import stat
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from loguru import logger
from torch import nn
from tqdm.auto import tqdm

from hyimage.errors import CheckpointError
from hyimage.loading.verify import check_finite

PathLike = str | os.PathLike
Rows = tuple[int, int | None]
GetTensor = Callable[..., torch.Tensor]  # (key, rows=None): the tensor, or a (start, stop) range of its rows
Translate = Callable[[Iterable[str], GetTensor], Iterator[tuple[str, torch.Tensor]]]
Transform = Callable[[Iterator[tuple[str, torch.Tensor]]], Iterator[tuple[str, torch.Tensor]]]

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
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
KNOWN_SAFETENSORS_DTYPES = frozenset(
    "BOOL F4 F6_E2M3 F6_E3M2 U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 F8_E4M3FNUZ F8_E5M2FNUZ "
    "I16 U16 F16 BF16 I32 U32 F32 C64 F64 I64 U64".split()
)
"""Every dtype name the safetensors library (0.8) knows; SAFETENSORS_DTYPES are those hyimage reads."""
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80
SHOWN_KEYS = 5


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, and where its bytes lie in the file."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclass(frozen=True)
class TensorSource:
    """One safetensors file and the map from its keys to the model's keys (None: same keys)."""

    path: Path
    translate: Translate | None = None


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in FLOAT8_DTYPES


def _damaged(path: Path, problem: str) -> CheckpointError:
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
        raise _damaged(path, f"the header describes {position} bytes, the file has only {size}")
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
            raise _damaged(path, f"{size} bytes, shorter than a safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > MAX_HEADER_BYTES:
            raise _invalid(path, f"the header claims {header_size} bytes, more than the {MAX_HEADER_BYTES} allowed")
        if 8 + header_size > size:
            raise _damaged(path, f"the header claims {header_size} bytes, the file has {size}")
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


def _row_range(info: TensorInfo, rows: Rows | None) -> tuple[tuple[int, ...], int]:
    """Shape and file offset of `rows` (start, stop) of the first dimension, clipped as slicing clips."""
    if rows is None:
        return info.shape, info.offset
    if not info.shape:
        raise ValueError("a row range needs a tensor of at least one dimension")
    start, stop = slice(*rows).indices(info.shape[0])[:2]
    count = max(0, stop - start)
    row_bytes = torch.Size(info.shape[1:]).numel() * info.dtype.itemsize
    return (count, *info.shape[1:]), info.offset + start * row_bytes


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


def _read_exactly(file: BinaryIO, offset: int, buffer: memoryview) -> int:
    file.seek(offset)
    done = 0
    while done < len(buffer):
        count = file.readinto(buffer[done:])
        if not count:
            break
        done += count
    return done


class SafetensorsReader:
    """Reads the tensors of one safetensors file, each into fresh CPU memory in its stored dtype."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.infos = read_tensor_infos(self.path)
        self._file: BinaryIO | None = None

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, key: str, rows: Rows | None = None) -> torch.Tensor:
        """The tensor `key`, newly read from the file (owned by the caller); `rows=(start, stop)` reads only
        that range of its first dimension (stop None: to the end), as slicing would."""
        if key not in self.infos:
            raise KeyError(f"{self.path} has no tensor {key!r}")
        info = self.infos[key]
        shape, offset = _row_range(info, rows)
        tensor = torch.empty(shape, dtype=info.dtype)
        if tensor.nbytes:
            if self._file is None:
                self._file = open(self.path, "rb", buffering=0)
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            if _read_exactly(self._file, offset, buffer) != tensor.nbytes:
                raise _damaged(self.path, f"tensor {key!r} ends past the end of the file")
        return tensor

    def get_meta(self, key: str, rows: Rows | None = None) -> torch.Tensor:
        """A `meta` stand-in for `key` (or its `rows`) with the stored shape and dtype (reads nothing)."""
        info = self.infos[key]
        return torch.empty(_row_range(info, rows)[0], dtype=info.dtype, device="meta")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _identity(keys: Iterable[str], get_tensor: GetTensor) -> Iterator[tuple[str, torch.Tensor]]:
    for key in keys:
        yield key, get_tensor(key)


def _as_source(source: PathLike | TensorSource) -> TensorSource:
    return source if isinstance(source, TensorSource) else TensorSource(Path(source))


def _stream(
    readers: Sequence[tuple[TensorSource, SafetensorsReader]], meta: bool
) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(model key, tensor, file) over all sources; a key already given by an earlier source is skipped."""
    seen: set[str] = set()
    for source, reader in readers:
        translate = source.translate or _identity
        for key, tensor in translate(reader.keys(), reader.get_meta if meta else reader.get):
            if key not in seen:
                seen.add(key)
                yield key, tensor, source.path


def _bytes_to_read(readers: Sequence[tuple[TensorSource, SafetensorsReader]]) -> int:
    """How many bytes the stream will read (from the headers alone)."""
    return sum(tensor.nbytes for _, tensor, _ in _stream(readers, meta=True))


def _watched(
    stream: Iterator[tuple[str, torch.Tensor, Path]], bar: tqdm, verify: bool
) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """The stream, advancing `bar` by each tensor's stored bytes and, with `verify`, checking it is finite."""
    for key, tensor, path in stream:
        if verify:
            check_finite(key, tensor, path)
        bar.update(tensor.nbytes)
        yield key, tensor, path


def _target_dtype(key: str, tensor: torch.Tensor, dtype: torch.dtype | None, keep_dtype: Collection[str]):
    if dtype is None or key in keep_dtype or not tensor.is_floating_point() or is_float8(tensor.dtype):
        return tensor.dtype
    return dtype


def _converted(
    stream: Iterator[tuple[str, torch.Tensor, Path]],
    dtype: torch.dtype | None,
    device: torch.device,
    keep_dtype: Collection[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor in its target dtype on `device`, in memory of its own (a view is copied out)."""
    for key, tensor, _ in stream:
        target = _target_dtype(key, tensor, dtype, keep_dtype)
        if device.type == "meta":
            yield key, torch.empty(tensor.shape, dtype=target, device=device)
        elif tensor.device == device and tensor.dtype == target and _owns_storage(tensor):
            yield key, tensor
        else:
            yield key, torch.empty(tensor.shape, dtype=target, device=device).copy_(tensor)


def _owns_storage(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes


def _dry_run(
    readers: Sequence[tuple[TensorSource, SafetensorsReader]],
    dtype: torch.dtype | None,
    keep_dtype: Collection[str],
    transform: Transform,
) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """What loading would produce, as meta tensors by key, and the file each source key comes from."""
    origins: dict[str, Path] = {}

    def recorded() -> Iterator[tuple[str, torch.Tensor, Path]]:
        for key, tensor, path in _stream(readers, meta=True):
            origins[key] = path
            yield key, tensor, path

    produced = dict(transform(_converted(recorded(), dtype, torch.device("meta"), keep_dtype)))
    return produced, origins


def _listing(items: list[str], what: str) -> str:
    shown = ", ".join(items[:SHOWN_KEYS]) + (", ..." if len(items) > SHOWN_KEYS else "")
    return f"  {len(items)} {what}: {shown}"


def _with_origin(key: str, origins: dict[str, Path]) -> str:
    return f"{key} (in {origins[key].name})" if key in origins else key


def _check(
    model: nn.Module,
    produced: dict[str, torch.Tensor],
    origins: dict[str, Path],
    files: list[Path],
    strict: bool,
) -> None:
    """Raise CheckpointError listing missing, unexpected, wrongly shaped and wrongly typed keys."""
    expected = model.state_dict(keep_vars=True)
    missing = [key for key in expected if key not in produced]
    unexpected = [_with_origin(key, origins) for key in produced if key not in expected] if strict else []
    shapes, kinds = [], []
    for key, tensor in produced.items():
        if key not in expected:
            continue
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            shapes.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(want.shape)}")
        elif is_float8(want.dtype) != is_float8(tensor.dtype):
            kinds.append(f"{key}: file {tensor.dtype} vs model {want.dtype}")
    if missing or unexpected or shapes or kinds:
        names = " + ".join(str(path) for path in files)
        lines = [f"{names} does not fit {type(model).__name__}:"]
        if missing:
            lines.append(_listing(missing, "missing keys (the model needs them, the file lacks them)"))
        if unexpected:
            lines.append(_listing(unexpected, "unexpected keys (in the file, unknown to the model)"))
        if shapes:
            lines.append(_listing(shapes, "keys with the wrong shape"))
        if kinds:
            lines.append(_listing(kinds, "keys stored as float8 on one side only"))
        lines.append("Check that the file is the checkpoint of this model and configuration.")
        raise CheckpointError("\n".join(lines))


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        requires_grad = old.requires_grad and tensor.is_floating_point() and not is_float8(tensor.dtype)
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=requires_grad)
    else:
        module._buffers[attr] = tensor


def load_safetensors_into(
    model: nn.Module,
    sources: Sequence[PathLike | TensorSource],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    keep_dtype: Collection[str] = (),
    transform: Transform | None = None,
    verify: bool = False,
    progress: str | None = None,
) -> nn.Module:
    """Fill the meta tensors of `model` from `sources`, one tensor at a time.

    Floating tensors become `dtype` (None: as stored) except float8 tensors and the keys in `keep_dtype`.
    An earlier source wins when two give the same key. `transform` may rewrite the converted
    (key, tensor) stream (e.g. quantize). Keys and shapes are checked on `meta` before any data is read;
    `strict=False` tolerates keys the model lacks, but every tensor of the model must come from the files.
    `verify`: scan each stored tensor for NaN/Inf as it is read. `progress`: the label of a byte progress bar
    on stderr (None: no bar; shown only when stderr is a terminal, as tqdm does with `disable=None`).
    """
    device = torch.device(device)
    sources = [_as_source(source) for source in sources]
    files = [source.path for source in sources]
    readers = [(source, SafetensorsReader(source.path)) for source in sources]
    transform = transform or (lambda stream: stream)

    produced, origins = _dry_run(readers, dtype, keep_dtype, transform)
    _check(model, produced, origins, files, strict)

    expected = model.state_dict(keep_vars=True)
    bar = tqdm(
        total=_bytes_to_read(readers) if progress else 0,
        desc=progress,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None if progress else True,
    )
    try:
        read = _watched(_stream(readers, meta=False), bar, verify)
        stream = transform(_converted(read, dtype, device, keep_dtype))
        for key, tensor in stream:
            if key in expected:
                _assign(model, key, tensor)
    finally:
        bar.close()
        for _, reader in readers:
            reader.close()
    assert_materialized(model, files)
    logger.debug("loaded {} tensors from {}", len(produced), " + ".join(map(str, files)))
    return model


def assert_materialized(model: nn.Module, files: Sequence[PathLike]) -> None:
    """Raise if any parameter or buffer of `model` is still on the meta device."""
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        names = " + ".join(str(path) for path in files)
        raise CheckpointError(
            f"after loading {names}, {type(model).__name__} still has tensors without data:\n"
            f"{_listing(left, 'tensors on meta')}\n"
            "These are not stored in the file; the model must create them itself."
        )
