"""`from_pretrained` for both pipelines: the official `ckpts/` layout to a pipeline whose parts load on first use.

Nothing heavy is read here. Each part is handed to the pipeline as a zero-argument factory and is
built when its stage first runs, so a part that a call never needs (the refiner, the reprompt model)
never occupies memory. The files the core parts need are checked up front, so a missing file is
reported before anything runs, with the `hyimage download` command that fetches it.

A DiT that is not the released size (a tiny test model, a fine-tune with another depth) is described
by `dit_config=` (a variant name, a dict of constructor arguments or a DiTConfig), or by a JSON file of
constructor arguments next to the checkpoint (`dit/hunyuanimage2.1.json` for `dit/hunyuanimage2.1*.safetensors`).
Without either, the named variant's released configuration is used.

`from_pretrained` keywords are normalised here before anything is read (`pipeline_from_pretrained`):
`torch_dtype` is an alias of `dtype`; the official keywords (`enable_stage1_offloading`,
`enable_full_dit_offloading` and the other `enable_*_offloading`, `device`, `reprompt_model=None`) map onto
the memory modes; an unknown keyword is refused naming the method and the closest valid keyword; the
first argument is a variant name or a local `ckpts/` folder.
"""

import functools
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from loguru import logger

from hyimage.checkpoints.download import check_present, download
from hyimage.checkpoints.hub import is_repo_id
from hyimage.checkpoints.layout import MODEL_ROOT_ENV, CheckpointLayout, model_root
from hyimage.checkpoints.needs import DownloadConfig
from hyimage.diffusion.request import RequestError, check_device, check_dtype, check_keywords
from hyimage.loading.part_sizes import part_host_bytes
from hyimage.loading.safetensors_io import regular_file_size
from hyimage.offload import MemoryManager
from hyimage.quantization.fp8 import FP8_COMPUTE_MODES, set_fp8_compute

VARIANTS = ("hunyuanimage-v2.1", "hunyuanimage-v2.1-distilled")
REFINER = "hunyuanimage-refiner"
REPROMPT_SIZES = {"32b": "32b", "7b": "7b", "hunyuanimage-reprompt-32b": "32b", "hunyuanimage-reprompt": "7b"}
OFFICIAL_OFFLOADING = (
    "enable_stage1_offloading",
    "enable_reprompt_model_offloading",
    "enable_refiner_offloading",
    "enable_text_encoder_offloading",
    "enable_full_dit_offloading",
    "enable_vae_offloading",
    "enable_byt5_offloading",
)
BASE_TEMPLATE = "dit-llm-encode-v2"
REFINER_TEMPLATE = "dit-llm-encode"

T = TypeVar("T")


class MissingCheckpointError(FileNotFoundError):
    """A file of the official layout that the chosen configuration needs is not there."""


def once(factory: Callable[[], T], shares: Callable[[], Any] | None = None) -> Callable[[], T]:
    """A zero-argument factory that builds on the first call and returns the same object afterwards, until its
    `release()` (the host memory plan's) drops it, and `shares`' too (a part it is built from and holds);
    `config` is passed on from `factory`."""
    built: list[T] = []

    def get() -> T:
        if not built:
            built.append(factory())
        return built[0]

    def release() -> None:
        built.clear()
        if shares is not None:
            shares.release()

    get.release = release
    if hasattr(factory, "config"):
        get.config = factory.config
    return get


def with_config(factory: Callable[[], T], config: Callable[[], Any]) -> Callable[[], T]:
    """`factory` carrying `config`, the part's configuration without building it (see `Parts.config`)."""
    factory.config = functools.lru_cache(maxsize=1)(config)
    return factory


def pipeline_from_pretrained(cls: type, model_name_or_path: Any, use_fp8: bool, kwargs: dict[str, Any]) -> Any:
    """`HunyuanImagePipeline.from_pretrained`: keywords normalised (see the module docstring), then `load_pipeline`."""
    kwargs = normalize_keywords("HunyuanImagePipeline.from_pretrained", load_pipeline, kwargs)
    variant, root = resolve_source(model_name_or_path, kwargs.pop("model_name", None), kwargs.pop("model_root", None))
    return load_pipeline(cls, model_name=variant or VARIANTS[0], use_fp8=use_fp8, model_root=root, **kwargs)


def refiner_from_pretrained(cls: type, model_name_or_path: Any, kwargs: dict[str, Any]) -> Any:
    """`HunyuanImageRefinerPipeline.from_pretrained`: as `pipeline_from_pretrained`, then `load_refiner_pipeline`."""
    kwargs = normalize_keywords("HunyuanImageRefinerPipeline.from_pretrained", load_refiner_pipeline, kwargs)
    variant, root = resolve_source(
        model_name_or_path, kwargs.pop("model_name", None), kwargs.pop("model_root", None), (REFINER,)
    )
    return load_refiner_pipeline(cls, model_name=variant or REFINER, model_root=root, **kwargs)


def normalize_keywords(method: str, loader: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`torch_dtype` and the official offloading keywords turned into the loader's own; unknown ones refused."""
    kwargs = dict(kwargs)
    valid = [p.name for p in inspect.signature(loader).parameters.values() if p.name != "cls"]
    check_keywords(method, kwargs, [*valid, "torch_dtype", *OFFICIAL_OFFLOADING])
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None:
        torch_dtype = check_dtype(torch_dtype, "torch_dtype")
        if kwargs.get("dtype") is not None and check_dtype(kwargs["dtype"]) != torch_dtype:
            raise RequestError(
                "torch_dtype", f"`torch_dtype`={torch_dtype} and `dtype`={kwargs['dtype']} differ; pass one"
            )
        kwargs["dtype"] = torch_dtype
    elif kwargs.get("dtype") is not None:
        kwargs["dtype"] = check_dtype(kwargs["dtype"])
    if kwargs.get("device") is not None:
        kwargs["device"] = check_device(kwargs["device"])
    flags = {name: kwargs.pop(name) for name in OFFICIAL_OFFLOADING if name in kwargs}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise RequestError(name, f"`{name}` must be True or False, got {value!r}")
    if flags:
        # every part kept on the device only when all named offloading is off; otherwise the official offloading
        mode = "none" if not any(flags.values()) else "model"
        asked = kwargs.get("memory_mode")
        if asked is not None and (asked == "none") != (mode == "none"):
            raise RequestError(
                "memory_mode", f"memory_mode={asked!r} contradicts {', '.join(f'{k}={v}' for k, v in flags.items())}; "
                "pass one of them (offloading off is memory_mode='none')"
            )
        kwargs["memory_mode"] = asked if asked is not None else mode
    return kwargs


def resolve_source(
    model_name_or_path: Any, model_name: str | None, root: Any, variants: tuple[str, ...] = VARIANTS
) -> tuple[str | None, Any]:
    """The variant and the checkpoint root from `from_pretrained`'s first argument: a variant name, a local
    `ckpts/` folder (the variant then from `model_name`, default the base model) or a Hub repo id (passed on
    to `load_pipeline`, which fetches it)."""
    if model_name_or_path is None:
        return model_name, root
    name = os.fspath(model_name_or_path) if isinstance(model_name_or_path, (str, os.PathLike)) else None
    if name is None:
        raise RequestError(
            "model_name_or_path", f"must be a variant name or a folder, got {type(model_name_or_path).__name__}"
        )
    if variants == VARIANTS and is_hub_repo_id(name):
        return name, root
    if name in variants:
        if model_name is not None and model_name != name:
            raise RequestError("model_name", f"`model_name`={model_name!r} and the first argument {name!r} differ")
        return name, root
    if Path(name).expanduser().is_dir():
        if root is not None and Path(root).resolve() != Path(name).expanduser().resolve():
            raise RequestError("model_root", f"`model_root`={root} and the folder {name} differ; pass one")
        return model_name, Path(name).expanduser()
    raise RequestError(
        "model_name_or_path",
        f"{name!r} is neither a variant ({', '.join(variants)}), an existing local ckpts/ folder nor a Hub "
        "repository id (owner/name)",
    )


def load_pipeline(
    cls: type,
    model_name: str = "hunyuanimage-v2.1",
    use_fp8: bool = False,
    *,
    model_root: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    text_encoder_dtype: torch.dtype | None = None,
    memory_mode: str | None = None,
    gpu_budget_gb: float | None = None,
    host_budget_gb: float | None = None,
    memory: MemoryManager | None = None,
    reprompt_model: str | None = "32b",
    trust_remote_code: bool = False,
    refiner: bool = True,
    dit_config: Any = None,
    refiner_dit_config: Any = None,
    use_distilled: bool = False,
    progress_bar: bool = True,
    dit_file: str | os.PathLike | None = None,
    fp8_compute: str | None = None,
    compile: bool = False,
    parallel: Any = None,
    verify: bool = False,
) -> Any:
    """Build `cls` (HunyuanImagePipeline) from the layout under `model_root` ($HUNYUANIMAGE_V2_1_MODEL_ROOT, ./ckpts).

    `use_fp8`: the official `*_fp8.safetensors` + `*_fp8_scale.safetensors` when present, else the bf16
    file quantized while loading. `memory_mode` "auto" (default: the memory plan of `hyimage.offload.planner`
    within `gpu_budget_gb`, else the free GPU memory, and `host_budget_gb`) | "none" | "model" | "block".
    `device` is where parts run (default CPU until `pipe.to(...)`). `dtype` (DiT) and `text_encoder_dtype`
    default to bf16 (the official DiT dtype and Qwen2.5-VL's published dtype) when the pipeline runs on CUDA
    and to float32 elsewhere, decided when the part is first built (after `pipe.to`); an FP8 DiT keeps its other weights in bf16 everywhere. `reprompt_model` "32b" or "7b"
    (the official names work too); the 7B's tokenizer is remote code and needs `trust_remote_code` set to True.
    `refiner=False` drops the refiner. `dit_config`/`refiner_dit_config`: see the module docstring.
    `model_name` may also be a Hub repository id in the official layout (e.g. "tencent/HunyuanImage-2.1"):
    what the configuration needs is fetched into the model root first (see `hub_model_root`).
    `dit_file`: another DiT file for `model_name` (a GGUF, a ComfyUI single file, ...) instead of the layout's.
    `fp8_compute` "scaled_mm" | "dequant" | None ("dequant", the official numerics) and `compile`: see `_with_speed`.
    `parallel`: a `hyimage.ParallelConfig` (run under torchrun), checked against the models and the launch here.
    `progress_bar` also shows byte bars while the DiT and text encoder are read (when stderr is a terminal);
    `verify=True` scans every weight for NaN/Inf as it is read and names the tensor and file of the first.
    """
    if fp8_compute is not None and fp8_compute not in FP8_COMPUTE_MODES:
        raise ValueError(f"fp8_compute {fp8_compute!r} is unknown; choose 'scaled_mm', 'dequant' or None (dequant)")
    if is_hub_repo_id(model_name):
        variant = VARIANTS[1] if use_distilled else VARIANTS[0]
        model_root = hub_model_root(model_name, variant, use_fp8, refiner, model_root, progress_bar)
        model_name = variant
    if use_distilled:
        model_name = "hunyuanimage-v2.1-distilled"
    if model_name not in VARIANTS:
        raise ValueError(f"model_name {model_name!r} is unknown; choose one of {', '.join(VARIANTS)}")
    if reprompt_model is not None and reprompt_model not in REPROMPT_SIZES:
        raise ValueError(f"reprompt_model {reprompt_model!r} is unknown; choose one of {', '.join(REPROMPT_SIZES)}")
    layout, memory, command_root = _setup(model_root, memory, device, memory_mode, gpu_budget_gb, host_budget_gb)
    needs = DownloadConfig(variant=model_name, fp8=use_fp8, refiner=refiner)
    check_present(needs, layout.root, progress=progress_bar)

    config = _dit_config(layout, model_name, dit_config)
    state = _parallel(parallel, model_name, config, layout, refiner_dit_config if refiner else None, device, refiner)
    if state is not None and device is None and state.device.type == "cuda":
        memory.to(state.device)
    plan_for(memory, model_name, use_fp8, refiner, REPROMPT_SIZES.get(reprompt_model), config, dit_file)
    memory.part_sizes = lambda device: part_host_bytes(
        layout, model_name, config, _dit_config(layout, REFINER, refiner_dit_config) if refiner else None,
        use_fp8, dit_dtype(memory, use_fp8, dtype), text_encoder_dtype, REPROMPT_SIZES.get(reprompt_model), device,
        dit_file,
    )
    dit = _with_speed(
        _dit_factory(
            layout, model_name, config, use_fp8, dtype, memory, needs, command_root, dit_file,
            verify=verify, progress_bar=progress_bar,
        ),
        fp8_compute,
        compile,
    )
    vae_dir = _require(layout.vae / "config.json", "VAE", needs, command_root).parent
    _require(layout.text_encoder / "config.json", "MLLM text encoder", needs, command_root)
    uses_glyph = bool(_config_value(config, "glyph_byT5_v2", True))
    if uses_glyph:
        _check_glyph(layout, needs, command_root)

    text_encoder = once(
        lambda: _text_encoder(layout, BASE_TEMPLATE, text_encoder_dtype, memory, verify, progress_bar)
    )
    refiner_pipeline = None
    if refiner:
        refiner_needs = DownloadConfig(variant=model_name, fp8=use_fp8, refiner=True)
        refiner_pipeline = once(
            lambda: _refiner_pipeline(
                layout, use_fp8, dtype, memory, refiner_dit_config, refiner_needs, command_root,
                text_encoder=once(lambda: _with_template(text_encoder(), REFINER_TEMPLATE), shares=text_encoder),
                progress_bar=progress_bar,
                parallel=state,
                verify=verify,
            )
        )
    size = REPROMPT_SIZES.get(reprompt_model)
    reprompt_needs = DownloadConfig(variant=model_name, fp8=use_fp8, refiner=refiner, reprompt=size)
    return cls(
        dit=dit,
        vae=_vae_factory("HunyuanVAE2D", vae_dir, memory, verify=verify),
        text_encoder=text_encoder,
        glyph_encoder=(lambda: _glyph_encoder(layout, memory, verify)) if uses_glyph else None,
        reprompt_model=(
            (lambda: _reprompter(layout, size, memory, trust_remote_code, reprompt_needs, command_root, verify))
            if size
            else None
        ),
        refiner_pipeline=refiner_pipeline,
        memory=memory,
        progress_bar=progress_bar,
        parallel=state,
    )


def _parallel(
    parallel: Any, variant: str, config: Any, layout: CheckpointLayout, refiner_config: Any, device: Any, refiner: bool
) -> Any:
    """The ParallelState for `parallel`, refused before loading when a model cannot use it."""
    if parallel is None:
        return None
    from hyimage.parallel.runner import prepare_parallel

    models = {variant: (_config_value(config, "heads_num", 0), not _config_value(config, "guidance_embed", False))}
    if refiner:
        refiner_cfg = _dit_config(layout, REFINER, refiner_config)
        models[f"{REFINER} (used when use_refiner=True)"] = (_config_value(refiner_cfg, "heads_num", 0), True)
    device_type = None if device is None else torch.device(device).type
    return prepare_parallel(parallel, models, device_type)


def load_refiner_pipeline(
    cls: type,
    use_fp8: bool = False,
    *,
    model_root: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    text_encoder_dtype: torch.dtype | None = None,
    memory_mode: str | None = None,
    gpu_budget_gb: float | None = None,
    host_budget_gb: float | None = None,
    memory: MemoryManager | None = None,
    dit_config: Any = None,
    progress_bar: bool = True,
    model_name: str = REFINER,
    verify: bool = False,
) -> Any:
    """Build `cls` (HunyuanImageRefinerPipeline) alone, e.g. to refine existing images; arguments as `load_pipeline`."""
    if model_name != REFINER:
        raise ValueError(f"model_name {model_name!r} is not the refiner; use {REFINER!r}")
    layout, memory, command_root = _setup(model_root, memory, device, memory_mode, gpu_budget_gb, host_budget_gb)
    needs = DownloadConfig(fp8=use_fp8, refiner=True, base=False)
    check_present(needs, layout.root, progress=progress_bar)
    plan_for(memory, VARIANTS[1], use_fp8, True, None, REFINER)
    memory.part_sizes = lambda device: part_host_bytes(
        layout, VARIANTS[1], None, _dit_config(layout, REFINER, dit_config), use_fp8, dit_dtype(memory, use_fp8, dtype),
        text_encoder_dtype, None, device, base=False,
    )
    _require(layout.text_encoder / "config.json", "MLLM text encoder", needs, command_root)
    return _refiner_pipeline(
        layout, use_fp8, dtype, memory, dit_config, needs, command_root,
        text_encoder=once(
            lambda: _text_encoder(layout, REFINER_TEMPLATE, text_encoder_dtype, memory, verify, progress_bar)
        ),
        progress_bar=progress_bar, cls=cls, verify=verify,
    )


def is_hub_repo_id(name: str) -> bool:
    """'owner/name' that is neither a variant name nor an existing local folder."""
    return name not in VARIANTS and is_repo_id(name) and not Path(name).exists()


def hub_model_root(
    repo_id: str,
    variant: str,
    use_fp8: bool,
    refiner: bool,
    root: str | os.PathLike | None,
    progress_bar: bool = True,
) -> Path:
    """Fetch what `variant` needs from Hub repository `repo_id` (the official layout) into the model root; return it.

    The text encoders come from their own repositories as with `hyimage download`; nothing is asked of the
    network when the files are already there and checked.
    """
    path = model_root(root)
    config = DownloadConfig(variant=variant, fp8=use_fp8, refiner=refiner, repo_id=repo_id)
    download(config, path, progress=progress_bar)
    return path


def _setup(
    root: str | os.PathLike | None,
    memory: MemoryManager | None,
    device: str | torch.device | None,
    memory_mode: str | None,
    gpu_budget_gb: float | None,
    host_budget_gb: float | None = None,
) -> tuple[CheckpointLayout, MemoryManager, Path | None]:
    """The layout of the checked checkpoint root, the memory manager (the given one, else one for the mode) and
    the root to name in `hyimage download` hints (None when it is the default)."""
    path = model_root_for(root)
    memory = memory if memory is not None else make_memory(device, memory_mode, gpu_budget_gb, host_budget_gb)
    return CheckpointLayout(path), memory, None if root is None else path


def model_root_for(root: str | os.PathLike | None) -> Path:
    """The checkpoint root, which must exist."""
    path = model_root(root)
    if not path.is_dir():
        source = "model_root" if root is not None else f"${MODEL_ROOT_ENV}, default ./ckpts"
        raise MissingCheckpointError(
            f"checkpoint folder {path} (from {source}) does not exist; fetch the checkpoints with "
            f"`hyimage download --model-root {path}`, or point ${MODEL_ROOT_ENV} at the folder that holds them"
        )
    return path


def make_memory(
    device: str | torch.device | None,
    mode: str | None,
    gpu_budget_gb: float | None,
    host_budget_gb: float | None = None,
) -> MemoryManager:
    """The memory manager for a mode name (default "auto": the memory plan, within `gpu_budget_gb` when given)."""
    return MemoryManager(
        device if device is not None else "cpu", mode or "auto", gpu_budget_gb=gpu_budget_gb,
        host_budget_gb=host_budget_gb,
    )


def plan_for(
    memory: MemoryManager,
    variant: str,
    fp8: bool,
    refiner: bool,
    reprompt: str | None,
    config: Any,
    dit_file: str | os.PathLike | None = None,
) -> None:
    """Tell an "auto" manager what it plans for (the released configuration's name, or the DiT's own config, and
    the DiT file loaded instead of the variant's: a GGUF file is planned from its header)."""
    from hyimage.offload.planner import PlanRequest

    if memory.mode == "auto" and memory.request is None:
        memory.request = PlanRequest(variant=variant, fp8=fp8, refiner=refiner, reprompt=reprompt,
                                     dit_config=None if isinstance(config, str) else config,
                                     dit_file=None if dit_file is None else str(dit_file))


def compute_dtype(memory: MemoryManager, cuda_dtype: torch.dtype) -> torch.dtype:
    """`cuda_dtype` when parts run on CUDA; float32 elsewhere (half precision on CPU is slow and partly unsupported)."""
    return cuda_dtype if memory.device.type == "cuda" else torch.float32


def _load_device(memory: MemoryManager) -> torch.device:
    """Parts are read straight onto the device only when they stay there; else into host memory."""
    return memory.device if memory.mode == "none" else memory.offload_device


def _require(path: Path, what: str, needs: DownloadConfig, command_root: Path | None) -> Path:
    if not path.exists():
        raise MissingCheckpointError(
            f"{path} not found: the {what} of {needs.describe()} needs it. "
            f"Fetch it with `{needs.command(command_root)}`, or set $HUNYUANIMAGE_V2_1_MODEL_ROOT to the folder "
            "that holds the official ckpts/ layout (see ckpts/README.md)"
        )
    return path


def _dit_config(layout: CheckpointLayout, variant: str, override: Any) -> Any:
    """The override, else the JSON next to the checkpoint, else the variant's released configuration.

    Checked by type and range now, before anything is built (an error names the JSON file and the key).
    """
    from hyimage.models.dit.configs import resolve_dit_config

    if override is not None:
        return resolve_dit_config(override, source="dit_config")
    config_file = layout.dit_config(variant)
    if os.path.lexists(config_file):
        logger.info(f"DiT configuration from {config_file}")
        regular_file_size(config_file, "DiT configuration")
        try:
            content = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{config_file} is not valid JSON ({error}); fix or remove it") from error
        if not isinstance(content, dict):
            raise ValueError(f"{config_file} must hold a JSON object of DiT constructor arguments; fix or remove it")
        return resolve_dit_config(content, source=str(config_file))
    return variant


def _config_value(config: Any, key: str, default: Any) -> Any:
    if isinstance(config, str):
        from hyimage.models.dit.configs import resolve_dit_config

        return getattr(resolve_dit_config(config), key)
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _dit_factory(
    layout: CheckpointLayout,
    variant: str,
    config: Any,
    use_fp8: bool,
    dtype: torch.dtype | None,
    memory: MemoryManager,
    needs: DownloadConfig,
    command_root: Path | None,
    dit_file: str | os.PathLike | None = None,
    verify: bool = False,
    progress_bar: bool = True,
) -> Callable[[], torch.nn.Module]:
    """Pick the DiT file now (so a missing one fails early); read it on first use."""
    bf16, fp8, scale = layout.dit(variant), layout.dit_fp8(variant), layout.dit_fp8_scale(variant)
    what = f"{variant} DiT"
    if dit_file is not None:
        if not Path(dit_file).is_file():
            raise FileNotFoundError(f"dit_file {dit_file} does not exist; pass the path of a .safetensors or .gguf DiT")
        kwargs = dict(path=Path(dit_file))
    elif use_fp8 and fp8.is_file():
        _require(scale, f"{what} (FP8 scales)", needs, command_root)
        kwargs = dict(path=fp8, fp8_scale=scale)
    elif use_fp8 and bf16.is_file():
        logger.info(f"{fp8.name} not found: quantizing {bf16.name} to FP8 while loading")
        kwargs = dict(path=bf16, quantize_fp8=True)
    else:
        if not use_fp8 and not bf16.is_file() and fp8.is_file():
            raise MissingCheckpointError(
                f"{bf16} not found, but its FP8 version {fp8.name} is there: pass use_fp8=True "
                f"(CLI: --fp8), or fetch the bf16 file with `{needs.command(command_root)}`"
            )
        _require(fp8 if use_fp8 else bf16, what, needs, command_root)
        kwargs = dict(path=bf16)

    def load() -> torch.nn.Module:
        from hyimage.models.dit.model import HYImageDiffusionTransformer

        options = {k: v for k, v in kwargs.items() if k != "path"}
        return HYImageDiffusionTransformer.from_single_file(
            kwargs["path"], config, dtype=dit_dtype(memory, use_fp8, dtype), device=_load_device(memory),
            verify=verify, progress_bar=progress_bar, **options,
        ).eval()

    return with_config(load, lambda: _resolved(config))


def dit_dtype(memory: MemoryManager, use_fp8: bool, dtype: torch.dtype | None) -> torch.dtype:
    """The DiT's dtype: FP8 weights dequantize into bf16, the dtype the rest of an FP8 model is kept in (as the
    official); else bf16 on CUDA, float32 elsewhere, unless `dtype` is given."""
    return dtype if dtype is not None else torch.bfloat16 if use_fp8 else compute_dtype(memory, torch.bfloat16)


def _resolved(config: Any) -> Any:
    from hyimage.models.dit.configs import resolve_dit_config

    return resolve_dit_config(config)


def _with_speed(
    factory: Callable[[], torch.nn.Module], fp8_compute: str | None, compile: bool
) -> Callable[[], torch.nn.Module]:
    """The DiT with its FP8 layers set to `fp8_compute` and, with `compile`, its blocks torch.compiled."""
    if fp8_compute is None and not compile:
        return factory

    def build() -> torch.nn.Module:
        model = factory()
        set_fp8_compute(model, fp8_compute)
        return model.compile_blocks() if compile else model

    return with_config(build, factory.config)


def _check_glyph(layout: CheckpointLayout, needs: DownloadConfig, command_root: Path | None) -> None:
    """Either format of Glyph-SDXL-v2 will do: the official (ModelScope) one or the diffusers one."""
    encoder_dir, tokenizer_dir = layout.glyph_diffusers
    if (encoder_dir / "config.json").is_file() and tokenizer_dir.is_dir():
        return
    if layout.glyph_checkpoint.is_file():
        _require(layout.byt5 / "config.json", "ByT5 glyph encoder (configuration)", needs, command_root)
        for asset in layout.glyph_assets:
            _require(asset, "ByT5 glyph encoder (Glyph-SDXL-v2 assets)", needs, command_root)
        return
    _require(encoder_dir / "config.json", "ByT5 glyph encoder (Glyph-SDXL-v2)", needs, command_root)


def _glyph_encoder(layout: CheckpointLayout, memory: MemoryManager, verify: bool = False) -> Any:
    from hyimage.text_encoders.glyph import GlyphByT5Encoder

    device = _load_device(memory)
    encoder_dir, _ = layout.glyph_diffusers
    if (encoder_dir / "config.json").is_file():
        return GlyphByT5Encoder.from_diffusers(layout.glyph, device=device, verify=verify)
    return GlyphByT5Encoder.from_pretrained(layout.byt5, layout.glyph, device=device, verify=verify)


def _text_encoder(
    layout: CheckpointLayout,
    template: str,
    dtype: torch.dtype | None,
    memory: MemoryManager,
    verify: bool = False,
    progress_bar: bool = True,
) -> Any:
    from hyimage.text_encoders.mllm import MLLMTextEncoder

    chosen = dtype if dtype is not None else compute_dtype(memory, torch.bfloat16)
    device = _load_device(memory)
    return MLLMTextEncoder.from_pretrained(
        layout.text_encoder, template=template, dtype=chosen, device=device, verify=verify, progress_bar=progress_bar
    )


def _with_template(encoder: Any, template: str) -> Any:
    """The same language model (no second copy) read with another prompt template."""
    return type(encoder)(encoder.model, encoder.tokenizer, template)


def _vae_factory(
    name: str, directory: Path, memory: MemoryManager, cuda_dtype: torch.dtype | None = None, verify: bool = False
) -> Callable[[], torch.nn.Module]:
    """Read the VAE on first use; its configuration from config.json without reading the weights."""

    def config() -> Any:
        import hyimage.models as models
        from hyimage.loading.vae_loader import CONFIG_FILE, build_on_meta, read_vae_config

        model_cls = getattr(models, name)
        path = directory / CONFIG_FILE
        return build_on_meta(model_cls, read_vae_config(path, model_cls)[0], path).config

    return with_config(lambda: _vae(name, directory, memory, cuda_dtype, verify), config)


def _vae(
    name: str, directory: Path, memory: MemoryManager, cuda_dtype: torch.dtype | None = None, verify: bool = False
) -> torch.nn.Module:
    """A VAE in its stored dtype, or in `cuda_dtype` when the pipeline runs on CUDA (the official refiner VAE: fp16)."""
    import hyimage.models as models

    dtype = cuda_dtype if memory.device.type == "cuda" else None
    model = getattr(models, name).from_pretrained(directory, dtype=dtype, device=_load_device(memory), verify=verify)
    return model.eval()


def _reprompter(
    layout: CheckpointLayout,
    size: str,
    memory: MemoryManager,
    trust_remote_code: bool,
    needs: DownloadConfig,
    command_root: Path | None,
    verify: bool = False,
) -> Any:
    from hyimage.reprompt import Reprompter

    path = _require(layout.reprompt(size) / "config.json", f"{size} reprompt model", needs, command_root).parent
    return Reprompter.from_pretrained(path, size, memory=memory, trust_remote_code=trust_remote_code, verify=verify)


def _refiner_pipeline(
    layout: CheckpointLayout,
    use_fp8: bool,
    dtype: torch.dtype | None,
    memory: MemoryManager,
    dit_config: Any,
    needs: DownloadConfig,
    command_root: Path | None,
    *,
    text_encoder: Callable[[], Any],
    progress_bar: bool,
    cls: type | None = None,
    parallel: Any = None,
    verify: bool = False,
) -> Any:
    if cls is None:
        from hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline import HunyuanImageRefinerPipeline as cls
    vae_dir = _require(layout.refiner_vae / "config.json", "refiner VAE", needs, command_root).parent
    config = _dit_config(layout, REFINER, dit_config)
    return cls(
        dit=_dit_factory(
            layout, REFINER, config, use_fp8, dtype, memory, needs, command_root, verify=verify, progress_bar=progress_bar
        ),
        vae=_vae_factory("AutoencoderKLConv3D", vae_dir, memory, torch.float16, verify),
        text_encoder=text_encoder,
        memory=memory,
        progress_bar=progress_bar,
        parallel=parallel,
    )
