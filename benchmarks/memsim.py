"""Peak device memory of the real code at full size, without a GPU: fake CUDA tensors and a live-bytes tracker.

`LiveBytes` is a TorchDispatchMode that sees every tensor an operator returns and counts the bytes of each
storage, per device, from its creation until it is freed (weak references to the storages), as
`torch.cuda.max_memory_allocated` counts the caching allocator's blocks (without its rounding to 512 bytes).
The same tracker runs on real tensors, which is how the simulation is checked (tests/test_memory_plan.py).

`fake_cuda()` runs code under `FakeTensorMode` with tensors that claim to be on `cuda` on a CPU-only build,
handling what such a build lacks:
- moving a tensor to `cuda` (`.to`, `.cuda`, `copy_` into it) needs a CUDA device guard: the move is replaced
  by a new fake CUDA tensor of the same shape, dtype and strides as `.to` gives them (values do not matter;
  a view that is not dense, such as a tile, becomes contiguous rather than keeping its base's extent), a
  `copy_` into a CUDA tensor (from anywhere: the exact tiled VAE writes tiles into views) is skipped, and
  `param.data = t` updates the parameter's fake device;
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
- `.contiguous()` of a strided CUDA tensor (the GGUF dequantisers' field reads) is a new tensor of its shape;
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
                # strides as `.to` keeps them: a dense tensor's own, a view's (a tile) made contiguous
                return torch.empty_like(t, dtype=_target_dtype(t, args, kwargs), device="cuda")
        if func is torch.Tensor.copy_ and args[0].device.type == "cuda":
            return args[0]  # in place, no allocation (a copy into a CUDA view takes a device guard)
        if func is torch.Tensor.__getitem__ and args[0].device.type == "cuda":
            return _getitem(*args)
        if func is torch.Tensor.contiguous and args[0].device.type == "cuda" and not args[0].is_contiguous():
            return torch.empty(args[0].shape, dtype=args[0].dtype, device="cuda")  # the copy (values do not matter)
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
    if sum(isinstance(i, torch.Tensor) for i in index) > 1:  # several advanced indices: numpy semantics in one op
        if not all(isinstance(i, torch.Tensor) or i == slice(None) for i in index):
            raise NotImplementedError("fake CUDA indexing: several tensor indices mixed with other than ':'")
        return torch.ops.aten.index.Tensor(t, [i if isinstance(i, torch.Tensor) else None for i in index])
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
    if q.ndim == 3:  # (B, L, E): one head
        out = _efficient_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask, scale=scale)
        return out.squeeze(1)
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
    module.requires_grad_(False)
    return module.to_empty(device=device)


# Stages at full size.
MANIFESTS = __import__("pathlib").Path(__file__).resolve().parent.parent / "tests" / "data" / "manifests"


def build_dit(config: Any, fp8: bool, dtype: torch.dtype = torch.bfloat16, gguf: str | None = None) -> torch.nn.Module:
    """The DiT of `config` on meta in `dtype` (FP8 linears when `fp8`, GGUF linears of type `gguf` as the memory
    planner estimates such a file), as loaded for a CUDA run."""
    from hyimage.models.dit.model import HYImageDiffusionTransformer

    with torch.device("meta"):
        model = HYImageDiffusionTransformer(**config.to_dict(), dtype=dtype)
    if fp8:
        from hyimage.quantization.fp8 import convert_to_fp8_linear, fp8_linear_modules

        convert_to_fp8_linear(model, fp8_linear_modules(model))
    if gguf is not None:
        from hyimage.offload.dit_weights import _quantize_like_gguf

        _quantize_like_gguf(model, gguf)
    return model.eval()


def attach_lora(dit: torch.nn.Module, rank: int) -> None:
    """One LoRA of `rank` on every linear layer of the DiT's blocks (meta tensors: shapes only)."""
    from hyimage.lora.keys import LoraUpdate, linear_layers
    from hyimage.lora.layers import add_adapter

    updates = [
        LoraUpdate(name, torch.empty(rank, layer.in_features, device="meta"),
                   torch.empty(layer.out_features, rank, device="meta"))
        for name, layer in linear_layers(dit).items()
        if name.startswith(("double_blocks.", "single_blocks."))
    ]
    add_adapter(dit, "simulated", updates, 1.0)


def simulate_dit(
    config: Any,
    *,
    fp8: bool,
    batch: int,
    image_tokens: tuple[int, ...],
    text_tokens: int,
    glyph_tokens: int,
    mode: str = "model",
    weight_budget_gib: float | None = None,
    device: str = "cuda",
    dtype: torch.dtype | None = None,
    gguf: str | None = None,
    lora_rank: int = 0,
) -> dict[str, float]:
    """Peak GiB on `device` of one DiT forward as the pipeline runs it (`run_dit` under `memory.running`).

    `image_tokens` is the latent grid (h, w) or (t, h, w); on "cuda" everything is fake, on "cpu" (float32,
    real tensors) the caller must keep the model small. `dtype`: bf16 on CUDA (under autocast, as the pipeline
    runs it), float32 on the CPU; float32 on CUDA runs without autocast (the real-vs-simulated check). `gguf`: the
    DiT's linears quantised to that GGUF type; `lora_rank`: a LoRA of that rank on every block linear. Returns
    the peak, the weights on the device and the activations (peak minus what was live before the forward)."""
    from hyimage.diffusion.pipelines.parts import run_dit
    from hyimage.offload import MemoryManager

    fake = device == "cuda"
    dtype = dtype or (torch.bfloat16 if fake else torch.float32)
    if fake:
        dit = build_dit(config, fp8, dtype, gguf)  # on meta, outside fake mode (see simulate_vae_decode)
        if lora_rank:
            attach_lora(dit, lora_rank)
    else:
        from hyimage.models.dit.model import HYImageDiffusionTransformer

        dit = HYImageDiffusionTransformer(**config.to_dict(), dtype=dtype).eval().requires_grad_(False)
    with fake_cuda() if fake else torch.no_grad():
        if fake:
            materialize(dit)
        tracker = LiveBytes()
        with tracker:
            tracker.track([*dit.parameters(), *dit.buffers()])
            memory = MemoryManager(device, mode, gpu_budget_gb=weight_budget_gib)
            x = torch.randn(batch, config.in_channels, *image_tokens, device=device, dtype=dtype)
            t = torch.full((batch,), 900.0, device=device)
            text = torch.randn(batch, text_tokens, config.text_states_dim, device=device, dtype=dtype)
            text_mask = torch.ones(batch, text_tokens, dtype=torch.long, device=device)
            extra = {}
            if config.glyph_byT5_v2:
                extra["byt5_text_states"] = torch.randn(batch, glyph_tokens, 1472, device=device, dtype=dtype)
                extra["byt5_text_mask"] = torch.ones(batch, glyph_tokens, dtype=torch.long, device=device)
            if config.guidance_embed:
                extra["guidance"] = torch.full((batch,), 3250.0, device=device)
            if config.use_meanflow:
                extra["timesteps_r"] = t
            start = tracker.gib(device, "current")
            with memory.running(dit):
                weights = tracker.gib(device, "current") - start
                before = tracker.gib(device, "current")
                tracker.reset_peak()
                out = run_dit(dit, None if dtype == torch.float32 else dtype, x, t, text, text_mask, **extra)
                del out
                peak = tracker.gib(device)
    return {"peak": peak, "weights": weights, "activations": peak - before}


def vae_config(stage: str) -> dict:
    import json

    name = "vae_2_1" if stage == "vae_decode" else "vae_refiner"
    return json.loads((MANIFESTS / f"{name}.json").read_text())["config"]


def simulate_vae_decode(
    stage: str, width: int, height: int, encode: bool = False, exact: Any = None
) -> dict[str, float]:
    """Peak GiB on fake CUDA of the VAE decode of one image (stage "vae_decode": 2D, float32 as stored;
    "refiner_vae": the 3D VAE in float16, a frame pair, as the refiner decodes); `encode`: the refiner's encode
    of the image it refines instead. `exact`: an `ExactTiling` to run the exact tiled decode (or encode) with;
    its host activations count under "host" (GiB of host memory, peak minus what was live before)."""
    import hyimage.models as models
    from hyimage.offload import MemoryManager

    config = vae_config(stage)
    cls = models.HunyuanVAE2D if stage == "vae_decode" else models.AutoencoderKLConv3D
    dtype = torch.float32 if stage == "vae_decode" else torch.float16
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # outside fake mode: the fake tensor cache keeps weak references to meta tensors
            vae = cls(**config).eval()
    finally:
        torch.set_default_dtype(default)
    with fake_cuda():
        materialize(vae)
        factor = config["ffactor_spatial"]
        frames = 1  # the refiner decodes one latent frame (its channel pair holds the two image frames)
        tracker = LiveBytes()
        with tracker:
            tracker.track([*vae.parameters(), *vae.buffers()])
            memory = MemoryManager("cuda", "model")
            z = torch.randn(1, config["latent_channels"], frames, height // factor, width // factor,
                            device="cuda", dtype=dtype)
            pixels = torch.randn(1, 3, 1, height, width, device="cuda", dtype=dtype) if encode else None
            vae.exact_tiling = exact
            with memory.running(vae):
                before = tracker.gib("cuda", "current")
                host_before = tracker.gib("cpu", "current")
                tracker.reset_peak()
                out = vae.encode(pixels).latent_dist.mean if encode else vae.decode(z, return_dict=False)[0]
                del out
                peak = tracker.gib("cuda")
                host = tracker.gib("cpu") - host_before
    return {"peak": peak, "weights": before, "activations": peak - before, "host": host}


def qwen_text_model(layers: int) -> torch.nn.Module:
    """Qwen2.5-VL-7B's language model with `layers` decoder layers, on meta in bf16 (as the text encoder)."""
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    from hyimage.offload.needs import QWEN25VL_7B as c

    config = Qwen2_5_VLTextConfig(hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                                  num_hidden_layers=layers, num_attention_heads=c["heads"],
                                  num_key_value_heads=c["kv_heads"], vocab_size=c["vocab"])
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return Qwen2_5_VLTextModel(config).eval()
    finally:
        torch.set_default_dtype(default)


def simulate_text_encoder(tokens: int, layers: int = 1) -> dict[str, float]:
    """Peak GiB on fake CUDA of the MLLM text encoder's language model over one padded prompt of `tokens`
    (the call `MLLMTextEncoder._run` makes; the tokenizer is left out)."""
    from hyimage.offload import MemoryManager

    model = qwen_text_model(layers)
    with fake_cuda():
        materialize(model)
        tracker = LiveBytes()
        with tracker:
            tracker.track([*model.parameters(), *model.buffers()])
            ids = torch.zeros(1, tokens, dtype=torch.long, device="cuda")
            mask = torch.ones(1, tokens, dtype=torch.long, device="cuda")
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            with MemoryManager("cuda", "model").running(model):
                before = tracker.gib("cuda", "current")
                tracker.reset_peak()
                hidden = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
                del hidden
                peak = tracker.gib("cuda")
    return {"peak": peak, "weights": before, "activations": peak - before}
