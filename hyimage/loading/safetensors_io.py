"""Stream tensors from safetensors files into a model built on the `meta` device.

Tensors are read one at a time through `safe_open` (memory-mapped), converted to the requested
dtype on the requested device and assigned in place of the meta placeholders; the file's pages
are unmapped every few tens of MB so host memory never holds a second copy of the checkpoint.
"""

import os
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from loguru import logger
from safetensors import SafetensorError, safe_open
from torch import nn

PathLike = Union[str, os.PathLike]
GetTensor = Callable[[str], torch.Tensor]
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
RELEASE_EVERY_BYTES = 32 * 2**20
SHOWN_KEYS = 5


class CheckpointError(ValueError):
    """A checkpoint file is missing, incomplete, or does not fit the model."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, read from the file header."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclass(frozen=True)
class TensorSource:
    """One safetensors file and the map from its keys to the model's keys (None: same keys)."""

    path: Path
    translate: Optional[Translate] = None


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in FLOAT8_DTYPES


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist; check the path or download it")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise CheckpointError(
            f"{path} is incomplete or not a safetensors file ({error}); "
            "the download was probably interrupted: delete the file and download it again"
        ) from None


def read_tensor_infos(path: PathLike) -> dict[str, TensorInfo]:
    """Every tensor's shape and dtype from the header of `path`, without reading any data."""
    path = Path(path)
    with _open(path) as handle:
        infos = {}
        for key in handle.keys():
            view = handle.get_slice(key)
            stored = view.get_dtype()
            if stored not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {stored}, which hyimage does not read")
            infos[key] = TensorInfo(tuple(view.get_shape()), SAFETENSORS_DTYPES[stored])
    return infos


class SafetensorsReader:
    """Reads tensors of one file as memory-mapped views, re-opening the file to release pages already read."""

    def __init__(self, path: PathLike, release_every_bytes: int = RELEASE_EVERY_BYTES) -> None:
        self.path = Path(path)
        self.infos = read_tensor_infos(self.path)
        self._release_every = release_every_bytes
        self._handle = None
        self._mapped = 0

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`, backed by the file mapping: copy it before the next calls release that mapping."""
        if key not in self.infos:
            raise KeyError(f"{self.path} has no tensor {key!r}")
        if self._handle is None or self._mapped >= self._release_every:
            self.close()
            self._handle = _open(self.path).__enter__()
        self._mapped += self.infos[key].nbytes
        try:
            return self._handle.get_tensor(key)
        except SafetensorError as error:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} cannot be read ({error}); the file is damaged: download it again"
            ) from None

    def get_meta(self, key: str) -> torch.Tensor:
        """A `meta` stand-in for `key` with its stored shape and dtype (reads nothing)."""
        info = self.infos[key]
        return torch.empty(info.shape, dtype=info.dtype, device="meta")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle = None
            self._mapped = 0


def _identity(keys: Iterable[str], get_tensor: GetTensor) -> Iterator[tuple[str, torch.Tensor]]:
    for key in keys:
        yield key, get_tensor(key)


def _as_source(source: Union[PathLike, TensorSource]) -> TensorSource:
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


def _target_dtype(key: str, tensor: torch.Tensor, dtype: Optional[torch.dtype], keep_dtype: Collection[str]):
    if dtype is None or key in keep_dtype or not tensor.is_floating_point() or is_float8(tensor.dtype):
        return tensor.dtype
    return dtype


def _converted(
    stream: Iterator[tuple[str, torch.Tensor, Path]],
    dtype: Optional[torch.dtype],
    device: torch.device,
    keep_dtype: Collection[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor copied into fresh memory in its target dtype on `device` (nothing copied on meta)."""
    for key, tensor, _ in stream:
        target = torch.empty(tensor.shape, dtype=_target_dtype(key, tensor, dtype, keep_dtype), device=device)
        if device.type != "meta":
            target.copy_(tensor)
        yield key, target


def _dry_run(
    readers: Sequence[tuple[TensorSource, SafetensorsReader]],
    dtype: Optional[torch.dtype],
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
    sources: Sequence[Union[PathLike, TensorSource]],
    *,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
    keep_dtype: Collection[str] = (),
    transform: Optional[Transform] = None,
) -> nn.Module:
    """Fill the meta tensors of `model` from `sources`, one tensor at a time.

    Floating tensors become `dtype` (None: as stored) except float8 tensors and the keys in `keep_dtype`.
    An earlier source wins when two give the same key. `transform` may rewrite the converted
    (key, tensor) stream (e.g. quantize). Keys and shapes are checked on `meta` before any data is read.
    """
    device = torch.device(device)
    sources = [_as_source(source) for source in sources]
    files = [source.path for source in sources]
    readers = [(source, SafetensorsReader(source.path)) for source in sources]
    transform = transform or (lambda stream: stream)

    produced, origins = _dry_run(readers, dtype, keep_dtype, transform)
    _check(model, produced, origins, files, strict)

    expected = model.state_dict(keep_vars=True)
    try:
        stream = transform(_converted(_stream(readers, meta=False), dtype, device, keep_dtype))
        for key, tensor in stream:
            if key in expected:
                _assign(model, key, tensor)
    finally:
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
