"""Read the header of a GGUF file within the file's bounds: every count and length is checked before it is used.

Layout (GGUF v2/v3, as llama.cpp's `gguf.cpp` and the `gguf` package read it): the magic `GGUF`, a uint32
version, uint64 tensor and key/value counts; each key/value is a string key (uint64 length, UTF-8 bytes), a
uint32 value type and the value: a scalar, a string, or an array (uint32 item type, uint64 count, the items;
arrays may hold arrays); each tensor info is a name, a uint32 dimension count, the uint64 dimensions (innermost
first), a uint32 ggml type and a uint64 offset into the data, which starts at the first multiple of
`general.alignment` (default 32) after the header. A file whose version reads with its low 16 bits zero is
byte-swapped (big-endian), as the gguf package decides.

Why hand-written (measured with gguf 0.19): `gguf.GGUFReader` trusts every declared count. A 73-byte file that
declares an array of 2**40 uint8 makes it loop without end, building one numpy view per element while reading
nothing past the end (still running after 20 s under a 2 GiB limit), and a damaged header ends in an IndexError
or KeyError. Checking each count against the bytes left means walking the whole header; the walk that checks it
also yields the names, shapes, types and offsets hyimage needs, so the reader is not run after it (a second
parse, and its per-element arrays). Here a count is refused when its items could not fit in what is left of the
file, arrays are skipped (only small integer arrays, such as ComfyUI-GGUF's `comfy.gguf.orig_shape.<name>`, are
kept), nesting is limited, and every defect raises CheckpointError naming the file: memory stays a small
constant per key and tensor, and time is linear in the header's size.
"""

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hyimage.errors import CheckpointError
from hyimage.loading.safetensors_header import PathLike, regular_file_size
from hyimage.quantization.gguf import GGML_TYPES

MAGIC = b"GGUF"
VERSIONS = (2, 3)
STRING, ARRAY = 8, 9
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
"""struct formats of the scalar value types (uint8 ... float64) by GGUF value type id."""
INTEGER_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
UINT32 = 4
MAX_NESTING = 8
"""Arrays of arrays deeper than this are refused (llama.cpp reads no nested arrays at all)."""
KEPT_ARRAY_ITEMS = 64
"""Integer arrays up to this many items are kept as tuples; longer arrays are checked and skipped."""
DEFAULT_ALIGNMENT = 32
MIN_KV_BYTES = 8 + 4 + 1  # an empty key, the type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # an empty name, no dimensions, the type, the offset
MIN_ARRAY_BYTES = 4 + 8


@dataclass(frozen=True)
class GGUFArray:
    """An array value that was checked and skipped: its item type, item count and where its items start."""

    item_type: int
    count: int
    offset: int


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor info: its name, dimensions in ggml order (innermost first), ggml type and absolute byte range."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """The checked header: the version, the key/values (arrays as GGUFArray or small tuples) and the tensors."""

    version: int
    fields: dict[str, Any]
    tensors: list[HeaderTensor]
    data_offset: int


class _Cursor:
    """Reads the header front to back, refusing any read past the end of the file."""

    def __init__(self, file: BinaryIO, path: Path, size: int) -> None:
        self.file, self.path, self.size = file, path, size
        self.position = 0
        self.order = "<"

    @property
    def left(self) -> int:
        return self.size - self.position

    def damaged(self, problem: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path} is not a valid GGUF file ({problem}, at byte {self.position} of {self.size}); the file "
            "is truncated or damaged: download it again"
        )

    def need(self, count: int, item_bytes: int, what: str) -> None:
        """Refuse `count` items of at least `item_bytes` each when they cannot fit in the rest of the file."""
        if count * item_bytes > self.left:
            raise self.damaged(f"{what}: {count} declared, but only {self.left} bytes are left")

    def take(self, count: int, what: str) -> bytes:
        self.need(count, 1, what)
        data = self.file.read(count)
        if len(data) != count:  # the file shrank while it was read
            raise self.damaged(f"{what}: the file ends early")
        self.position += count
        return data

    def skip(self, count: int, what: str) -> None:
        self.need(count, 1, what)
        self.position += count
        self.file.seek(self.position)

    def scalar(self, type_id: int, what: str) -> Any:
        fmt = self.order + SCALARS[type_id]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str) -> str:
        length = self.u64(f"the length of {what}")
        data = self.take(length, what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.damaged(f"{what} is not UTF-8 text") from None


def _value(cursor: _Cursor, type_id: int, key: str, depth: int = 0) -> Any:
    """The value of `type_id` at the cursor: scalars and strings as Python values, arrays checked and skipped."""
    if type_id in SCALARS:
        return cursor.scalar(type_id, f"the value of {key!r}")
    if type_id == STRING:
        return cursor.string(f"the string value of {key!r}")
    if type_id != ARRAY:
        raise cursor.damaged(f"key {key!r} has value type {type_id}, which GGUF does not define")
    if depth >= MAX_NESTING:
        raise cursor.damaged(f"key {key!r} nests arrays more than {MAX_NESTING} deep")
    item_type = cursor.u32(f"the item type of array {key!r}")
    count = cursor.u64(f"the length of array {key!r}")
    start = cursor.position
    what = f"items of array {key!r}"
    if item_type in SCALARS:
        item_bytes = struct.calcsize(SCALARS[item_type])
        if item_type in INTEGER_TYPES and count <= KEPT_ARRAY_ITEMS:
            cursor.need(count, item_bytes, what)
            return tuple(cursor.scalar(item_type, what) for _ in range(count))
        cursor.skip(count * item_bytes, what)
    elif item_type == STRING:
        cursor.need(count, 8, what)
        for _ in range(count):
            cursor.skip(cursor.u64(f"the length of a string in array {key!r}"), f"a string in array {key!r}")
    elif item_type == ARRAY:
        cursor.need(count, MIN_ARRAY_BYTES, what)
        for _ in range(count):
            _value(cursor, ARRAY, key, depth + 1)
    else:
        raise cursor.damaged(f"array {key!r} has item type {item_type}, which GGUF does not define")
    return GGUFArray(item_type, count, start)


def _tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string("a tensor name")
    n_dims = cursor.u32(f"the dimension count of tensor {name!r}")
    cursor.need(n_dims, 8, f"dimensions of tensor {name!r}")
    dims = tuple(cursor.u64(f"a dimension of tensor {name!r}") for _ in range(n_dims))
    type_id = cursor.u32(f"the type of tensor {name!r}")
    offset = cursor.u64(f"the data offset of tensor {name!r}")
    return name, dims, type_id, offset


def _tensor_bytes(cursor: _Cursor, name: str, dims: tuple[int, ...], type_id: int) -> int:
    if type_id not in GGML_TYPES:
        raise CheckpointError(
            f"{cursor.path} holds tensors of GGUF type {type_id} (tensor {name!r}), which hyimage does not read"
        )
    type_name, block, block_bytes = GGML_TYPES[type_id]
    row = dims[0] if dims else 1
    if row % block:
        raise cursor.damaged(f"tensor {name!r} is {type_name} with rows of {row} values, not a multiple of {block}")
    return math.prod(dims) // block * block_bytes


def read_gguf_header(path: PathLike) -> GGUFHeader:
    """The header of the GGUF file `path`, every count checked against the file's size; CheckpointError if bad."""
    path = Path(path)
    size = regular_file_size(path)
    with open(path, "rb") as file:
        cursor = _Cursor(file, path, size)
        if cursor.take(min(4, size), "the magic") != MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
        version = cursor.u32("the version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            cursor.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in VERSIONS:
            raise CheckpointError(f"{path} is GGUF version {version}; hyimage reads versions 2 and 3")
        tensor_count = cursor.u64("the tensor count")
        kv_count = cursor.u64("the key/value count")
        cursor.need(kv_count, MIN_KV_BYTES, "key/values")
        fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string("a key")
            if key in fields:
                raise cursor.damaged(f"the key {key!r} appears twice")
            fields[key] = _value(cursor, cursor.u32(f"the value type of {key!r}"), key)
        cursor.need(tensor_count, MIN_TENSOR_INFO_BYTES, "tensor infos")
        infos = [_tensor_info(cursor) for _ in range(tensor_count)]
        alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cursor.damaged(f"general.alignment is {alignment!r}, not a power of two")
        data_offset = -(-cursor.position // alignment) * alignment
        tensors: list[HeaderTensor] = []
        names: set[str] = set()
        for name, dims, type_id, offset in infos:
            if name in names:
                raise cursor.damaged(f"the tensor {name!r} is listed twice")
            names.add(name)
            nbytes = _tensor_bytes(cursor, name, dims, type_id)
            end = data_offset + offset + nbytes
            if end > size:
                raise CheckpointError(
                    f"{path}: tensor {name!r} ends at byte {end}, past the end of the file ({size} bytes); the "
                    "file is truncated (an interrupted download?): download it again"
                )
            tensors.append(HeaderTensor(name, dims, type_id, data_offset + offset, nbytes))
    return GGUFHeader(version, fields, tensors, data_offset)


def original_shape(path: PathLike, header: GGUFHeader, tensor: HeaderTensor) -> tuple[int, ...]:
    """The tensor's torch shape: ComfyUI-GGUF's `comfy.gguf.orig_shape.<name>` when given, else the dims reversed."""
    stored = tuple(reversed(tensor.dims))
    key = f"comfy.gguf.orig_shape.{tensor.name}"
    shape = header.fields.get(key)
    if shape is None:
        return stored
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise CheckpointError(f"{path}: {key} must be a short array of non-negative integers, got {shape!r}")
    if math.prod(shape) != math.prod(stored):
        raise CheckpointError(
            f"{path}: {key} is {list(shape)} ({math.prod(shape)} values), but the tensor stores {math.prod(stored)}"
        )
    return shape
