"""Stream tensors from safetensors files into a model built on the `meta` device.

Tensors are read one at a time straight from the file into fresh memory, converted to the
requested dtype on the requested device and assigned in place of the meta placeholders, so host
memory holds the model plus one tensor in flight, never a second copy of the checkpoint.

The header is parsed by `safetensors_header`; each tensor is read with `readinto`: `safe_open(framework="pt")`
of safetensors 0.8 maps the whole file copy-on-write, which the kernel refuses (ENOMEM) for a 35 GB DiT on a machine with less RAM.
"""

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from loguru import logger
from torch import nn
from tqdm.auto import tqdm

from hyimage.errors import CheckpointError
from hyimage.loading.safetensors_header import PathLike, TensorInfo, damaged_file, is_float8, read_tensor_infos
from hyimage.loading.verify import check_finite

Rows = tuple[int, int | None]
GetTensor = Callable[..., torch.Tensor]  # (key, rows=None): the tensor, or a (start, stop) range of its rows
Translate = Callable[[Iterable[str], GetTensor], Iterator[tuple[str, torch.Tensor]]]
Transform = Callable[[Iterator[tuple[str, torch.Tensor]]], Iterator[tuple[str, torch.Tensor]]]



SHOWN_KEYS = 5


@dataclass(frozen=True)
class TensorSource:
    """One safetensors file and the map from its keys to the model's keys (None: same keys)."""

    path: Path
    translate: Translate | None = None


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
                raise damaged_file(self.path, f"tensor {key!r} ends past the end of the file")
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
