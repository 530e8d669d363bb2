"""The parts of a pipeline as zero-argument factories: each checks its files now and reads them on first use.

A factory carries the part's configuration (`config`, read without the weights) and, once built, is kept by
`once` until the host memory plan releases it (`release`).
"""

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from loguru import logger

import hyimage.models as models
from hyimage.checkpoints.layout import CheckpointLayout
from hyimage.checkpoints.needs import DownloadConfig
from hyimage.errors import MissingCheckpointError
from hyimage.loading.safetensors_header import regular_file_size
from hyimage.loading.vae_loader import CONFIG_FILE, build_on_meta, read_vae_config
from hyimage.models.dit.configs import DiTConfig, resolve_dit_config
from hyimage.models.dit.model import HYImageDiffusionTransformer
from hyimage.offload import MemoryManager
from hyimage.quantization.fp8 import set_fp8_compute

T = TypeVar("T")


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


def compute_dtype(memory: MemoryManager, cuda_dtype: torch.dtype) -> torch.dtype:
    """`cuda_dtype` when parts run on CUDA; float32 elsewhere (half precision on CPU is slow and partly unsupported)."""
    return cuda_dtype if memory.device.type == "cuda" else torch.float32


def load_device(memory: MemoryManager) -> torch.device:
    """Parts are read straight onto the device only when they stay there; else into host memory."""
    return memory.device if memory.mode == "none" else memory.offload_device


def require_file(path: Path, what: str, needs: DownloadConfig, command_root: Path | None) -> Path:
    if not path.exists():
        raise MissingCheckpointError(
            f"{path} not found: the {what} of {needs.describe()} needs it. "
            f"Fetch it with `{needs.command(command_root)}`, or set $HUNYUANIMAGE_V2_1_MODEL_ROOT to the folder "
            "that holds the official ckpts/ layout (see ckpts/README.md)"
        )
    return path


def dit_config_for(layout: CheckpointLayout, variant: str, override: Any) -> DiTConfig:
    """The override, else the JSON next to the checkpoint, else the variant's released configuration: resolved
    once here, where the configuration enters, and passed on as that (frozen) object.

    Checked by type and range now, before anything is built (an error names the JSON file and the key).
    """
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
    return resolve_dit_config(variant)


def dit_factory(
    layout: CheckpointLayout,
    variant: str,
    config: DiTConfig,
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
        require_file(scale, f"{what} (FP8 scales)", needs, command_root)
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
        require_file(fp8 if use_fp8 else bf16, what, needs, command_root)
        kwargs = dict(path=bf16)

    def load() -> torch.nn.Module:
        options = {k: v for k, v in kwargs.items() if k != "path"}
        return HYImageDiffusionTransformer.from_single_file(
            kwargs["path"], config, dtype=dit_dtype(memory, use_fp8, dtype), device=load_device(memory),
            verify=verify, progress_bar=progress_bar, **options,
        ).eval()

    return with_config(load, lambda: config)


def dit_dtype(memory: MemoryManager, use_fp8: bool, dtype: torch.dtype | None) -> torch.dtype:
    """The DiT's dtype: FP8 weights dequantize into bf16, the dtype the rest of an FP8 model is kept in (as the
    official); else bf16 on CUDA, float32 elsewhere, unless `dtype` is given."""
    return dtype if dtype is not None else torch.bfloat16 if use_fp8 else compute_dtype(memory, torch.bfloat16)


def with_speed(
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


def check_glyph(layout: CheckpointLayout, needs: DownloadConfig, command_root: Path | None) -> None:
    """Either format of Glyph-SDXL-v2 will do: the official (ModelScope) one or the diffusers one."""
    encoder_dir, tokenizer_dir = layout.glyph_diffusers
    if (encoder_dir / "config.json").is_file() and tokenizer_dir.is_dir():
        return
    if layout.glyph_checkpoint.is_file():
        require_file(layout.byt5 / "config.json", "ByT5 glyph encoder (configuration)", needs, command_root)
        for asset in layout.glyph_assets:
            require_file(asset, "ByT5 glyph encoder (Glyph-SDXL-v2 assets)", needs, command_root)
        return
    require_file(encoder_dir / "config.json", "ByT5 glyph encoder (Glyph-SDXL-v2)", needs, command_root)


def build_glyph_encoder(layout: CheckpointLayout, memory: MemoryManager, verify: bool = False) -> Any:
    from hyimage.text_encoders.glyph import GlyphByT5Encoder  # deferred: transformers loads when the part is built

    device = load_device(memory)
    encoder_dir, _ = layout.glyph_diffusers
    if (encoder_dir / "config.json").is_file():
        return GlyphByT5Encoder.from_diffusers(layout.glyph, device=device, verify=verify)
    return GlyphByT5Encoder.from_pretrained(layout.byt5, layout.glyph, device=device, verify=verify)


def build_text_encoder(
    layout: CheckpointLayout,
    template: str,
    dtype: torch.dtype | None,
    memory: MemoryManager,
    verify: bool = False,
    progress_bar: bool = True,
) -> Any:
    from hyimage.text_encoders.mllm import MLLMTextEncoder  # deferred: transformers loads when the part is built

    chosen = dtype if dtype is not None else compute_dtype(memory, torch.bfloat16)
    device = load_device(memory)
    return MLLMTextEncoder.from_pretrained(
        layout.text_encoder, template=template, dtype=chosen, device=device, verify=verify, progress_bar=progress_bar
    )


def with_template(encoder: Any, template: str) -> Any:
    """The same language model (no second copy) read with another prompt template."""
    return type(encoder)(encoder.model, encoder.tokenizer, template)


def vae_factory(
    name: str, directory: Path, memory: MemoryManager, cuda_dtype: torch.dtype | None = None, verify: bool = False
) -> Callable[[], torch.nn.Module]:
    """Read the VAE on first use; its configuration from config.json without reading the weights."""

    def config() -> Any:
        model_cls = getattr(models, name)
        path = directory / CONFIG_FILE
        return build_on_meta(model_cls, read_vae_config(path, model_cls)[0], path).config

    return with_config(lambda: build_vae(name, directory, memory, cuda_dtype, verify), config)


def build_vae(
    name: str, directory: Path, memory: MemoryManager, cuda_dtype: torch.dtype | None = None, verify: bool = False
) -> torch.nn.Module:
    """A VAE in its stored dtype, or in `cuda_dtype` when the pipeline runs on CUDA (the official refiner VAE: fp16)."""
    dtype = cuda_dtype if memory.device.type == "cuda" else None
    model = getattr(models, name).from_pretrained(directory, dtype=dtype, device=load_device(memory), verify=verify)
    return model.eval()


def build_reprompter(
    layout: CheckpointLayout,
    size: str,
    memory: MemoryManager,
    trust_remote_code: bool,
    needs: DownloadConfig,
    command_root: Path | None,
    verify: bool = False,
) -> Any:
    from hyimage.reprompt import Reprompter  # deferred: transformers loads when the part is built

    path = require_file(layout.reprompt(size) / "config.json", f"{size} reprompt model", needs, command_root).parent
    return Reprompter.from_pretrained(path, size, memory=memory, trust_remote_code=trust_remote_code, verify=verify)
