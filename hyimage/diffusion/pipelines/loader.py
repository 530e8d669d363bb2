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

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hyimage.checkpoints.download import check_present, download
from hyimage.checkpoints.layout import MODEL_ROOT_ENV, CheckpointLayout, model_root
from hyimage.checkpoints.needs import DownloadConfig
from hyimage.diffusion.pipelines.factories import (
    build_glyph_encoder,
    build_reprompter,
    build_text_encoder,
    check_glyph,
    dit_config_for,
    dit_dtype,
    dit_factory,
    once,
    require_file,
    vae_factory,
    with_speed,
    with_template,
)
from hyimage.diffusion.pipelines.keywords import is_hub_repo_id, normalize_keywords, resolve_source
from hyimage.diffusion.pipelines.part_sizes import part_host_bytes
from hyimage.errors import MissingCheckpointError
from hyimage.models.dit.configs import DIT_CONFIGS, resolve_dit_config
from hyimage.offload import MemoryManager
from hyimage.offload.request import PlanRequest
from hyimage.parallel.runner import prepare_parallel
from hyimage.quantization.fp8 import FP8_COMPUTE_MODES
from hyimage.variants import BASE, DISTILLED, REFINER, REPROMPT_SIZES, TEXT_TEMPLATES, TEXT_TO_IMAGE

VARIANTS = TEXT_TO_IMAGE


def pipeline_from_pretrained(
    cls: type, refiner_cls: type, model_name_or_path: Any, use_fp8: bool, kwargs: dict[str, Any]
) -> Any:
    """`HunyuanImagePipeline.from_pretrained`: keywords normalised (see the module docstring), then `load_pipeline`."""
    kwargs = normalize_keywords("HunyuanImagePipeline.from_pretrained", load_pipeline, kwargs)
    variant, root = resolve_source(model_name_or_path, kwargs.pop("model_name", None), kwargs.pop("model_root", None))
    return load_pipeline(cls, refiner_cls, model_name=variant or BASE, use_fp8=use_fp8, model_root=root, **kwargs)


def refiner_from_pretrained(cls: type, model_name_or_path: Any, kwargs: dict[str, Any]) -> Any:
    """`HunyuanImageRefinerPipeline.from_pretrained`: as `pipeline_from_pretrained`, then `load_refiner_pipeline`."""
    kwargs = normalize_keywords("HunyuanImageRefinerPipeline.from_pretrained", load_refiner_pipeline, kwargs)
    variant, root = resolve_source(
        model_name_or_path, kwargs.pop("model_name", None), kwargs.pop("model_root", None), (REFINER,)
    )
    return load_refiner_pipeline(cls, model_name=variant or REFINER, model_root=root, **kwargs)


def load_pipeline(
    cls: type,
    refiner_cls: type,
    model_name: str = BASE,
    use_fp8: bool = False,
    *,
    model_root: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    text_encoder_dtype: torch.dtype | None = None,
    memory_mode: str | None = None,
    gpu_budget_gb: float | None = None,
    host_budget_gb: float | str | None = "auto",
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
    """Build `cls` (HunyuanImagePipeline, with `refiner_cls` for its refiner stage) from the layout under `model_root` ($HUNYUANIMAGE_V2_1_MODEL_ROOT, ./ckpts).

    `use_fp8`: the official `*_fp8.safetensors` + `*_fp8_scale.safetensors` when present, else the bf16
    file quantized while loading. `memory_mode` "auto" (default: the memory plan of `hyimage.offload.planner`
    within `gpu_budget_gb`, else the free GPU memory, and `host_budget_gb`) | "none" | "model" | "block".
    `host_budget_gb`: host RAM (GiB) kept within in every mode, parts released between stages and read again when
    next needed: "auto" (default) what the machine can give when the first part is built (available memory, cgroup
    limits included, less a margin: `hyimage.offload.machine`), a number, or `float("inf")` (or None) for no limit.
    `device` is where parts run (default CPU until `pipe.to(...)`). `dtype` (DiT) and `text_encoder_dtype`
    default to bf16 (the official DiT dtype and Qwen2.5-VL's published dtype) when the pipeline runs on CUDA
    and to float32 elsewhere, decided when the part is first built (after `pipe.to`); an FP8 DiT keeps its other weights in bf16 everywhere. `reprompt_model` "32b" or "7b"
    (the official names work too); the 7B's tokenizer is remote code and needs `trust_remote_code` set to True.
    `refiner=False` drops the refiner. `dit_config`/`refiner_dit_config`: see the module docstring.
    `model_name` may also be a Hub repository id in the official layout (e.g. "tencent/HunyuanImage-2.1"):
    what the configuration needs is fetched into the model root first (see `hub_model_root`).
    `dit_file`: another DiT file for `model_name` (a GGUF, a ComfyUI single file, ...) instead of the layout's.
    `fp8_compute` "scaled_mm" | "dequant" | None ("dequant", the official numerics) and `compile`: see `with_speed`.
    `parallel`: a `hyimage.ParallelConfig` (run under torchrun), checked against the models and the launch here.
    `progress_bar` also shows byte bars while the DiT and text encoder are read (when stderr is a terminal);
    `verify=True` scans every weight for NaN/Inf as it is read and names the tensor and file of the first.
    """
    if fp8_compute is not None and fp8_compute not in FP8_COMPUTE_MODES:
        raise ValueError(f"fp8_compute {fp8_compute!r} is unknown; choose 'scaled_mm', 'dequant' or None (dequant)")
    if is_hub_repo_id(model_name):
        variant = DISTILLED if use_distilled else BASE
        model_root = hub_model_root(model_name, variant, use_fp8, refiner, model_root, progress_bar)
        model_name = variant
    if use_distilled:
        model_name = DISTILLED
    if model_name not in VARIANTS:
        raise ValueError(f"model_name {model_name!r} is unknown; choose one of {', '.join(VARIANTS)}")
    if reprompt_model is not None and reprompt_model not in REPROMPT_SIZES:
        raise ValueError(f"reprompt_model {reprompt_model!r} is unknown; choose one of {', '.join(REPROMPT_SIZES)}")
    needs = DownloadConfig(variant=model_name, fp8=use_fp8, refiner=refiner)
    layout, memory, command_root = _setup(model_root, needs, memory, device, memory_mode, gpu_budget_gb, host_budget_gb)
    check_present(needs, layout.root, progress=progress_bar)

    config = dit_config_for(layout, model_name, dit_config)
    state = _parallel(parallel, model_name, config, layout, refiner_dit_config if refiner else None, device, refiner)
    if state is not None and device is None and state.device.type == "cuda":
        memory.to(state.device)
    plan_for(memory, model_name, use_fp8, refiner, REPROMPT_SIZES.get(reprompt_model), config, dit_file)
    memory.part_sizes = lambda device: part_host_bytes(
        layout, model_name, config, dit_config_for(layout, REFINER, refiner_dit_config) if refiner else None,
        use_fp8, dit_dtype(memory, use_fp8, dtype), text_encoder_dtype, REPROMPT_SIZES.get(reprompt_model), device,
        dit_file,
    )
    dit = with_speed(
        dit_factory(
            layout, model_name, config, use_fp8, dtype, memory, needs, command_root, dit_file,
            verify=verify, progress_bar=progress_bar,
        ),
        fp8_compute,
        compile,
    )
    vae_dir = require_file(layout.vae / "config.json", "VAE", needs, command_root).parent
    require_file(layout.text_encoder / "config.json", "MLLM text encoder", needs, command_root)
    uses_glyph = config.glyph_byT5_v2
    if uses_glyph:
        check_glyph(layout, needs, command_root)

    text_encoder = once(
        lambda: build_text_encoder(layout, TEXT_TEMPLATES[model_name], text_encoder_dtype, memory, verify, progress_bar)
    )
    refiner_pipeline = None
    if refiner:
        refiner_needs = DownloadConfig(variant=model_name, fp8=use_fp8, refiner=True)
        refiner_pipeline = once(
            lambda: _refiner_pipeline(
                layout, use_fp8, dtype, memory, refiner_dit_config, refiner_needs, command_root,
                text_encoder=once(lambda: with_template(text_encoder(), TEXT_TEMPLATES[REFINER]), shares=text_encoder),
                progress_bar=progress_bar,
                cls=refiner_cls,
                parallel=state,
                verify=verify,
            )
        )
    size = REPROMPT_SIZES.get(reprompt_model)
    reprompt_needs = DownloadConfig(variant=model_name, fp8=use_fp8, refiner=refiner, reprompt=size)
    return cls(
        dit=dit,
        vae=vae_factory("HunyuanVAE2D", vae_dir, memory, verify=verify),
        text_encoder=text_encoder,
        glyph_encoder=(lambda: build_glyph_encoder(layout, memory, verify)) if uses_glyph else None,
        reprompt_model=(
            (lambda: build_reprompter(layout, size, memory, trust_remote_code, reprompt_needs, command_root, verify))
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
    models = {variant: (config.heads_num, not config.guidance_embed)}
    if refiner:
        refiner_cfg = dit_config_for(layout, REFINER, refiner_config)
        models[f"{REFINER} (used when use_refiner=True)"] = (refiner_cfg.heads_num, True)
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
    host_budget_gb: float | str | None = "auto",
    memory: MemoryManager | None = None,
    dit_config: Any = None,
    progress_bar: bool = True,
    model_name: str = REFINER,
    verify: bool = False,
) -> Any:
    """Build `cls` (HunyuanImageRefinerPipeline) alone, e.g. to refine existing images; arguments as `load_pipeline`."""
    if model_name != REFINER:
        raise ValueError(f"model_name {model_name!r} is not the refiner; use {REFINER!r}")
    needs = DownloadConfig(fp8=use_fp8, refiner=True, base=False)
    layout, memory, command_root = _setup(model_root, needs, memory, device, memory_mode, gpu_budget_gb, host_budget_gb)
    check_present(needs, layout.root, progress=progress_bar)
    plan_for(memory, DISTILLED, use_fp8, True, None, None)
    memory.part_sizes = lambda device: part_host_bytes(
        layout, DISTILLED, None, dit_config_for(layout, REFINER, dit_config), use_fp8, dit_dtype(memory, use_fp8, dtype),
        text_encoder_dtype, None, device, base=False,
    )
    require_file(layout.text_encoder / "config.json", "MLLM text encoder", needs, command_root)
    return _refiner_pipeline(
        layout, use_fp8, dtype, memory, dit_config, needs, command_root,
        text_encoder=once(
            lambda: build_text_encoder(layout, TEXT_TEMPLATES[REFINER], text_encoder_dtype, memory, verify, progress_bar)
        ),
        progress_bar=progress_bar, cls=cls, verify=verify,
    )


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
    needs: DownloadConfig,
    memory: MemoryManager | None,
    device: str | torch.device | None,
    memory_mode: str | None,
    gpu_budget_gb: float | None,
    host_budget_gb: float | str | None = "auto",
) -> tuple[CheckpointLayout, MemoryManager, Path | None]:
    """The layout of the checked checkpoint root, the memory manager (the given one, else one for the mode) and
    the root to name in `hyimage download` hints (None when it is the default)."""
    path = model_root_for(root, needs)
    memory = memory if memory is not None else make_memory(device, memory_mode, gpu_budget_gb, host_budget_gb)
    return CheckpointLayout(path), memory, None if root is None else path


def model_root_for(root: str | os.PathLike | None, needs: DownloadConfig | None = None) -> Path:
    """The checkpoint root, which must exist; else the error names the `hyimage download` command that fetches
    `needs` (the caller's variant, FP8, refiner) into it."""
    path = model_root(root)
    if not path.is_dir():
        source = "model_root" if root is not None else f"${MODEL_ROOT_ENV}, default ./ckpts"
        command = (needs if needs is not None else DownloadConfig()).command(path)
        raise MissingCheckpointError(
            f"checkpoint folder {path} (from {source}) does not exist; fetch the checkpoints with "
            f"`{command}`, or point ${MODEL_ROOT_ENV} at the folder that holds them"
        )
    return path


def make_memory(
    device: str | torch.device | None,
    mode: str | None,
    gpu_budget_gb: float | None,
    host_budget_gb: float | str | None = "auto",
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
    if memory.mode == "auto" and memory.request is None:
        memory.request = PlanRequest(variant=variant, fp8=fp8, refiner=refiner, reprompt=reprompt,
                                     dit_config=None if config is None or resolve_dit_config(config) == DIT_CONFIGS[variant] else config,
                                     dit_file=None if dit_file is None else str(dit_file))


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
    cls: type,
    parallel: Any = None,
    verify: bool = False,
) -> Any:
    vae_dir = require_file(layout.refiner_vae / "config.json", "refiner VAE", needs, command_root).parent
    config = dit_config_for(layout, REFINER, dit_config)
    return cls(
        dit=dit_factory(
            layout, REFINER, config, use_fp8, dtype, memory, needs, command_root, verify=verify, progress_bar=progress_bar
        ),
        vae=vae_factory("AutoencoderKLConv3D", vae_dir, memory, torch.float16, verify),
        text_encoder=text_encoder,
        memory=memory,
        progress_bar=progress_bar,
        parallel=parallel,
    )
