"""The LoRA methods of the pipelines (diffusers' names): load, weigh, fuse, unfuse and unload adapters on the DiT."""

import json
import math
import numbers
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from loguru import logger

from hyimage.errors import CheckpointError
from hyimage.loading.safetensors_header import MAX_HEADER_BYTES, checkpoint_format, regular_file_size
from hyimage.loading.safetensors_io import SafetensorsReader
from hyimage.loading.torch_io import read_torch_file, tensor_state_dict
from hyimage.loading.verify import check_state_finite
from hyimage.lora.keys import parse_lora
from hyimage.lora.layers import adapter_names, add_adapter, fuse, remove_adapters, set_scales, unfuse


def peft_alpha(path: Path) -> float | None:
    """`lora_alpha` from the `lora_adapter_metadata` diffusers writes into a LoRA's safetensors header (the
    PEFT LoraConfig, keys possibly prefixed `transformer.`), or None. Call after `read_tensor_infos` checked the
    header."""
    with open(path, "rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(size)) if size < MAX_HEADER_BYTES else {}
    raw = (header.get("__metadata__") or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        alpha = config.get("lora_alpha", config.get("transformer.lora_alpha"))
        alpha = None if alpha is None else float(alpha)
    except (ValueError, TypeError, AttributeError, RecursionError) as error:
        raise CheckpointError(f"{path}: its lora_adapter_metadata is not a PEFT LoraConfig with a numeric "
                              f"lora_alpha ({type(error).__name__}); rewrite the LoRA from a trusted copy") from None
    if alpha is not None and not math.isfinite(alpha):
        raise CheckpointError(f"{path}: its lora_adapter_metadata has lora_alpha {alpha}, not a finite number")
    return alpha


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file, told apart by its first bytes (not its suffix: a `.sft` file may be safetensors):
    safetensors, or a torch checkpoint read with weights_only=True (a pickle that would run code is refused).
    Every error names the file."""
    path = Path(path)
    if regular_file_size(path, "LoRA file") == 0:
        raise CheckpointError(f"LoRA file {path} is empty (an interrupted download?); download it again")
    kind = checkpoint_format(path)
    if kind == "safetensors":
        with SafetensorsReader(path) as reader:
            return {key: reader.get(key) for key in reader.keys()}
    if kind in ("torch-zip", "pickle"):
        return tensor_state_dict(read_torch_file(path, "LoRA file"), path)
    what = "a GGUF file" if kind == "gguf" else "neither a safetensors file nor a torch checkpoint (by its first bytes)"
    raise CheckpointError(f"LoRA file {path} is {what}; pass the LoRA's .safetensors file")


def check_scale(scale: object, source: str) -> float:
    """A LoRA scale: a finite real number (checked before the adapter touches the model)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"the scale of LoRA {source} must be a number, got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(scale):
        raise ValueError(f"the scale of LoRA {source} must be a finite number, got {scale}")
    return float(scale)


def parse_lora_spec(text: str) -> tuple[Path, float]:
    """CLI `--lora PATH[:SCALE]`: the path and the scale (1.0 when the part after the last ':' is no number)."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(text), 1.0


class LoraMixin:
    """`load_lora_weights`, `set_adapters`, `fuse_lora`, `unfuse_lora`, `unload_lora_weights` on `self.dit`."""

    def _lora_changed(self) -> None:
        """Block streaming captures a module's tensors when it is first streamed, and the "auto" memory plan counts
        the adapters: start both afresh after a change."""
        memory = getattr(self, "memory", None)
        if memory is not None:
            memory.adapters_changed(self.dit)

    def load_lora_weights(
        self,
        path_or_state_dict: str | Path | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        scale: float = 1.0,
        strict: bool = True,
    ) -> str:
        """Attach a LoRA (kohya sd-scripts, ComfyUI or diffusers/PEFT format, told apart by its keys) to the DiT.

        Returns the adapter's name (default: the file's stem, or `adapter_N`). Keys that match no layer of the
        DiT raise ValueError naming them, unless `strict=False`. Everything is checked before the DiT changes
        (the scale, the file, NaN/Inf in its tensors): a refused LoRA leaves no adapter, bank or hook behind.
        """
        alpha = None
        source = "the LoRA state dict" if isinstance(path_or_state_dict, dict) else str(path_or_state_dict)
        scale = check_scale(scale, source)
        if isinstance(path_or_state_dict, dict):
            state = path_or_state_dict
        else:
            state = read_lora_file(path_or_state_dict)
            if checkpoint_format(path_or_state_dict) == "safetensors":  # its header checked by read_lora_file
                alpha = peft_alpha(Path(path_or_state_dict))
        check_state_finite(state, source)
        dit = self.dit
        existing = adapter_names(dit)
        if adapter_name is None:
            stem = Path(path_or_state_dict).stem if not isinstance(path_or_state_dict, dict) else "adapter"
            base = "".join(c if c.isalnum() else "_" for c in stem).lstrip("0123456789") or "adapter"
            adapter_name, n = base, 1
            while adapter_name in existing:
                adapter_name, n = f"{base}_{n}", n + 1
        elif adapter_name in existing:
            raise ValueError(f"an adapter named {adapter_name!r} is loaded already; pick another adapter_name")
        updates, formats, skipped = parse_lora(state, dit, strict=strict, source=source, default_alpha=alpha)
        if not updates:
            raise ValueError(f"{source} holds no LoRA matrix for the DiT's layers")
        try:
            add_adapter(dit, adapter_name, updates, scale)
        except BaseException:  # e.g. out of memory moving the matrices: take back what was attached
            remove_adapters(dit, [adapter_name])
            raise
        self._lora_changed()
        logger.info(
            "LoRA {!r} ({} format) on {} layers, scale {}{}",
            adapter_name,
            "/".join(sorted(formats)),
            len(updates),
            scale,
            f"; {len(skipped)} keys skipped" if skipped else "",
        )
        return adapter_name

    def get_list_adapters(self) -> list[str]:
        """Names of the adapters loaded."""
        return adapter_names(self.dit)

    def set_adapters(self, names: str | Sequence[str], scales: float | Sequence[float] | None = None) -> None:
        """Run only the named adapters, with their scales (default 1.0); the others get scale 0."""
        names = [names] if isinstance(names, str) else list(names)
        if scales is None:
            scales = [1.0] * len(names)
        elif isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):  # one scale for every name
            scales = [scales] * len(names)
        scales = list(scales)
        if len(scales) != len(names):
            raise ValueError(f"set_adapters got {len(names)} names and {len(scales)} scales; pass one scale per name")
        scales = [check_scale(scale, repr(name)) for name, scale in zip(names, scales)]
        loaded = adapter_names(self.dit)
        unknown = [name for name in names if name not in loaded]
        if unknown:
            raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; loaded: {', '.join(loaded) or 'none'}")
        chosen = dict(zip(names, scales))
        set_scales(self.dit, {name: chosen.get(name, 0.0) for name in loaded})

    def fuse_lora(self, adapter_names: Sequence[str] | None = None) -> None:
        """Add the adapters' updates into the DiT's weights (FP8 weights are requantised; see `unfuse_lora`)."""
        count = fuse(self.dit, adapter_names)
        self._lora_changed()
        logger.info("fused LoRA into {} layers", count)

    def unfuse_lora(self) -> None:
        """Restore the weights as they were before `fuse_lora`, bit for bit."""
        unfuse(self.dit)
        self._lora_changed()

    def unload_lora_weights(self) -> None:
        """Remove every adapter (unfusing first): the DiT computes exactly as before any LoRA."""
        remove_adapters(self.dit)
        self._lora_changed()
