"""Peak device memory of the real code at full size, without a GPU: fake CUDA tensors and a live-bytes tracker.

`LiveBytes` is a TorchDispatchMode that sees every tensor an operator returns and counts the bytes of each
storage, per device, from its creation until it is freed (weak references to the storages), as
`torch.cuda.max_memory_allocated` counts the caching allocator's blocks (without its rounding to 512 bytes).
The same tracker runs on real tensors, which is how the simulation is checked (tests/test_memory_plan.py).

`fake_cuda()` runs code under `FakeTensorMode` with tensors that claim to be on `cuda` on a CPU-only build,
handling what such a build lacks:
- moving a tensor to `cuda` (`.to`, `.cuda`, `copy_` into it) needs a CUDA device guard: the move is replaced
  by a new fake CUDA tensor of the same shape, stride and dtype (values do not matter), and `param.data = t`
  updates the parameter's fake device;
- `torch.autocast("cuda")` turns itself off without CUDA: inside `fake_cuda()` it switches the CUDA autocast
  dispatch key on directly (`torch.set_autocast_enabled("cuda", True)`), so casts happen as on a GPU;
- SDPA on fake CUDA tensors would take the math kernel (an L x L score matrix that no GPU run allocates):
  CUDA calls are steered to `aten._scaled_dot_product_efficient_attention`, the kernel PyTorch picks on a GPU
  for a boolean key mask (flash-attn's varlen path, when installed, peaks within a few (B, L, D) gathers of it);
- CUDA streams and events (the block streamer's prefetch) become no-ops, so prefetched blocks stay live exactly
  as long as the real code keeps them;
- Python indexing of a CUDA tensor takes a device guard: `t[...]` is rebuilt from aten slice/select/index ops;
  a data-dependent truth value (`bool(mask.all())` in the attention mask) reads False: masks count as padded,
  the larger case;
- `pin_memory` returns the tensor (pinned memory is host memory); item assignment into a CUDA tensor
  (`mask[:, 0] = True`), in place and needing a device guard for the scalar, is skipped.
Gradients must be off (a fake CUDA parameter that requires grad needs a device guard too).
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1024**3


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes per device type of every storage created while the mode is on (plus `track`ed ones)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int, str]] = {}
        self.current: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def track(self, tensors: Any) -> None:
        """Count tensors made before the mode started (e.g. parameters)."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def _purge(self) -> None:
        for key in [k for k, (ref, _, _) in self._live.items() if ref.expired()]:
            _, size, device = self._live.pop(key)
            self.current[device] -= size

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref.cdata in self._live:
            return
        device = t.device.type
        size = storage.nbytes()
        self._live[ref.cdata] = (ref, size, device)
        self.current[device] = self.current.get(device, 0) + size
        self.peak[device] = max(self.peak.get(device, 0), self.current[device])

    def reset_peak(self) -> None:
        self._purge()
        self.peak = dict(self.current)

    def gib(self, device: str = "cuda", which: str = "peak") -> float:
        self._purge()
        return getattr(self, which).get(device, 0) / GIB

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._purge()
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def _target_device(args: tuple, kwargs: dict) -> torch.device | None:
    device = kwargs.get("device")
    if device is None:
        device = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
    if device is None:
        device = next((a.device for a in args[1:] if isinstance(a, torch.Tensor)), None)
    return None if device is None else torch.device(device)


def _target_dtype(t: torch.Tensor, args: tuple, kwargs: dict) -> torch.dtype:
    dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
    if dtype is None:
        dtype = next((a.dtype for a in args[1:] if isinstance(a, torch.Tensor)), t.dtype)
    return dtype


class _FakeCuda(TorchFunctionMode):
    """Replaces what needs a CUDA build (see the module docstring) while FakeTensorMode is on."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            t = args[0]
            device = torch.device("cuda") if func is torch.Tensor.cuda else _target_device(args, kwargs)
            if device is not None and device.type == "cuda" and t.device.type != "cuda":
                return torch.empty_strided(t.shape, t.stride(), dtype=_target_dtype(t, args, kwargs), device="cuda")
        if func is torch.Tensor.copy_ and args[0].device.type == "cuda" and args[1].device.type != "cuda":
            return args[0]
        if func is torch.Tensor.__getitem__ and args[0].device.type == "cuda":
            return _getitem(*args)
        if func is torch.Tensor.__bool__ and isinstance(args[0], FakeTensor):
            return False  # a data-dependent truth value (`bool(mask.all())`): masks count as padded
        if func is torch.Tensor.__setitem__ and args[0].device.type == "cuda":
            return None  # in place, no allocation; values do not matter (a Python scalar would need a device guard)
        if func in (torch.Tensor.pin_memory, torch.Tensor.record_stream):
            return args[0] if func is torch.Tensor.pin_memory else None
        if func is torch.Tensor.is_pinned:
            return True
        if func is F.scaled_dot_product_attention and args[0].device.type == "cuda":
            return _efficient_attention(*args, **kwargs)
        if func in _OPERATORS and args[0].device.type == "cuda":
            return _OPERATORS[func](*args, **kwargs)
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") == "__set__" and isinstance(args[1], torch.Tensor):
            args[0].fake_device = args[1].device  # `param.data = t`: the parameter now claims t's device
        return out


_OPERATORS = {
    torch.Tensor.__invert__: torch.bitwise_not,
    torch.Tensor.__and__: torch.bitwise_and,
    torch.Tensor.__or__: torch.bitwise_or,
    torch.Tensor.__xor__: torch.bitwise_xor,
}
"""Python operators whose tensor method takes a device guard, and the function computing the same."""


def _getitem(t: torch.Tensor, index: Any) -> torch.Tensor:
    """`t[index]` for None, int, slice, Ellipsis and integer tensor indices, through aten ops (Python indexing
    of a CUDA tensor takes a device guard)."""
    index = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    out, dim = t, 0
    for i in index:
        if i is None:
            out, dim = out.unsqueeze(dim), dim + 1
        elif i is Ellipsis:
            dim += t.ndim - consumed
        elif isinstance(i, slice):
            start = 0 if i.start is None else i.start
            stop = out.shape[dim] if i.stop is None else i.stop
            out, dim = torch.ops.aten.slice.Tensor(out, dim, start, stop, i.step or 1), dim + 1
        elif isinstance(i, int):
            out = out.select(dim, i)
        elif isinstance(i, torch.Tensor) and not i.dtype.is_floating_point and i.dtype != torch.bool:
            out = torch.ops.aten.index.Tensor(out, [None] * dim + [i])
            dim += i.ndim
        else:
            raise NotImplementedError(f"fake CUDA indexing with {type(i).__name__}")
    return out


def _efficient_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_: Any):
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            # the additive bias torch makes of a boolean mask (its values do not matter here)
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
        bias = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, False, scale=scale)[0]


class _Stream:
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    def wait_event(self, *args: Any) -> None: ...
    def wait_stream(self, *args: Any) -> None: ...


class _Event(_Stream):
    def record(self, *args: Any) -> None: ...


class _Autocast(contextlib.ContextDecorator):
    """torch.autocast that really switches CUDA autocast on in a CPU build (the CPU case is left to torch)."""

    def __init__(self, device_type: str, dtype: torch.dtype | None = None, enabled: bool = True, **kwargs: Any):
        self.device_type = device_type
        self.inner = None if device_type == "cuda" else _REAL_AUTOCAST(device_type, dtype=dtype, enabled=enabled)
        self.dtype = dtype or torch.float16
        self.enabled = enabled

    def __enter__(self):
        if self.inner is not None:
            return self.inner.__enter__()
        self.saved = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        torch.set_autocast_enabled("cuda", self.enabled)
        torch.set_autocast_dtype("cuda", self.dtype)
        torch.autocast_increment_nesting()
        return self

    def __exit__(self, *exc: Any):
        if self.inner is not None:
            return self.inner.__exit__(*exc)
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", self.saved[0])
        torch.set_autocast_dtype("cuda", self.saved[1])
        return False


_REAL_AUTOCAST = torch.autocast


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """FakeTensorMode in which `cuda` tensors, moves, autocast, streams and attention behave as on a GPU."""
    patched = {"Stream": _Stream, "Event": _Event, "stream": lambda s=None: contextlib.nullcontext(),
               "current_stream": lambda device=None: _Stream()}
    saved = {name: getattr(torch.cuda, name) for name in patched}
    for name, value in patched.items():
        setattr(torch.cuda, name, value)
    torch.autocast = _Autocast
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode, _FakeCuda():
            yield mode
    finally:
        torch.autocast = _REAL_AUTOCAST
        for name, value in saved.items():
            setattr(torch.cuda, name, value)


def materialize(module: torch.nn.Module, device: str = "cpu") -> torch.nn.Module:
    """A module built on `meta` given fake storage on `device` (call inside `fake_cuda()`), gradients off."""
    module.to_empty(device=device)
    return module.requires_grad_(False)
