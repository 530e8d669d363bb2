"""Read torch checkpoints (`torch.save` files) without running pickled code, and name the file in every error.

Every torch file hyimage reads (the VAE `pytorch_model.ckpt`/`.pt`, Glyph-SDXL-v2's `byt5_model.pt`) goes through
`read_torch_file`: `torch.load(weights_only=True)`, memory-mapped when the file is a zip archive. A pickle that
would call anything but tensor rebuilders is refused by torch's restricted unpickler; the error then says which
file and which callable, and never suggests loading it unrestricted. Folders read through transformers
(`from_pretrained`) are wrapped by `transformers_errors`, so their errors name the folder too.
"""

import contextlib
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import huggingface_hub.errors
import torch

from hyimage.errors import CheckpointError, UnsafeCheckpointError
from hyimage.loading.safetensors_header import PathLike, regular_file_size

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# transformers' configs are strict dataclasses from huggingface_hub 0.34 on; none before (catches nothing then)
STRICT_FIELD_ERRORS = tuple(getattr(huggingface_hub.errors, name) for name in ("StrictDataclassError",)
                            if hasattr(huggingface_hub.errors, name))


def _unsafe_reason(error: BaseException) -> str:
    """The line of torch's message naming the refused global or opcode (without its advice to unrestrict)."""
    for line in str(error).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip()
    return type(error).__name__


def _unsafe(path: Path, reason: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} holds a pickle that would run code when loaded ({reason}); hyimage reads torch files with "
        "torch.load(weights_only=True) only and refuses files that could run code when loaded. Use the file of "
        "the official release (download it again), or convert the weights to safetensors from a copy you trust"
    )


def _damaged(path: Path, error: BaseException) -> CheckpointError:
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    return CheckpointError(
        f"{path} cannot be read as a torch checkpoint ({first_line}); the file is truncated or damaged "
        "(an interrupted download?): delete it and download it again"
    )


def read_torch_file(path: PathLike, what: str = "checkpoint file") -> Any:
    """The object saved in `path` by `torch.save`, loaded on the CPU with `weights_only=True`."""
    path = Path(path)
    size = regular_file_size(path, what)
    if size == 0:
        raise CheckpointError(f"{what} {path} is empty (an interrupted download?): delete it and download it again")
    is_zip = zipfile.is_zipfile(path)
    try:
        if path.suffix == ".safetensors":  # torch.load reads a path by this suffix as safetensors: give it the bytes
            with open(path, "rb") as file:
                return torch.load(file, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error) or "Unsupported" in str(error):
            raise _unsafe(path, _unsafe_reason(error)) from None
        raise _damaged(path, error) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise _damaged(path, error) from None


def tensor_state_dict(checkpoint: Any, path: PathLike, wrapper: str | None = "state_dict") -> dict[str, torch.Tensor]:
    """`checkpoint` (or its `wrapper` entry) as a dict of name -> tensor; anything else names the file and entry."""
    if wrapper is not None and isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(wrapper), Mapping):
        checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(checkpoint).__name__}, not a state dict (a mapping of names to tensors"
            f"{f', possibly under {wrapper!r}' if wrapper else ''}); check that it is the checkpoint of the release"
        )
    for key, value in checkpoint.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {key!r} of its state dict is a {type(value).__name__}, not a tensor; "
                "a checkpoint of the release maps names to tensors only: download it again"
            )
    return dict(checkpoint)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


@contextlib.contextmanager
def transformers_errors(folder: PathLike, what: str, file: str | None = None) -> Iterator[None]:
    """Re-raise what transformers' `from_pretrained` raises on a bad `folder` as a CheckpointError naming it (and
    `file` in it, when the error can only come from that file: a config.json with a wrong field type)."""
    folder = Path(folder)
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, ImportError, CheckpointError):
        raise
    except STRICT_FIELD_ERRORS as error:  # a field of the wrong type (transformers' configs are strict dataclasses)
        detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise CheckpointError(
            f"{folder / file if file else folder}: the {what} has a field of the wrong type ({detail}); fix the "
            "value or download the file again"
        ) from error
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, EOFError, UnpicklingError) as error:
        unpickling = next((e for e in _chain(error) if isinstance(e, pickle.UnpicklingError)), None)
        if unpickling is not None and ("GLOBAL" in str(unpickling) or "Unsupported" in str(unpickling)):
            files = sorted(name for name in os.listdir(folder) if name.endswith(TORCH_SUFFIXES))
            raise UnsafeCheckpointError(
                f"the {what} in {folder} cannot be loaded: a torch file there ({', '.join(files) or 'unknown'}) holds "
                f"a pickle that would run code when loaded ({_unsafe_reason(unpickling)}). hyimage loads weights "
                "with weights_only=True only: use the safetensors files of the official release (download the "
                "folder again)"
            ) from None
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else ""
        raise CheckpointError(
            f"the {what} in {folder} could not be read ({type(error).__name__}: {first_line}); check the folder "
            "against the release and download it again"
        ) from error
