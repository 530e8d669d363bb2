"""The LoRA methods of the pipelines (diffusers' names): load, weigh, fuse, unfuse and unload adapters on the DiT."""

import json
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from loguru import logger

from hyimage.loading.safetensors_io import SafetensorsReader
from hyimage.lora.keys import parse_lora
from hyimage.lora.layers import adapter_names, add_adapter, fuse, remove_adapters, set_scales, unfuse


def peft_alpha(path: Path) -> float | None:
    """`lora_alpha` from the `lora_adapter_metadata` diffusers writes into a LoRA's safetensors header (the
    PEFT LoraConfig, keys possibly prefixed `transformer.`), or None."""
    with open(path, "rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(size)) if size < 100 * 2**20 else {}
    raw = (header.get("__metadata__") or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    config = json.loads(raw)
    alpha = config.get("lora_alpha", config.get("transformer.lora_alpha"))
    return None if alpha is None else float(alpha)


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file: safetensors, or a torch checkpoint read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        with SafetensorsReader(path) as reader:
            return {key: reader.get(key) for key in reader.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict of tensors; pass a .safetensors LoRA")
    return state


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
        DiT raise ValueError naming them, unless `strict=False`.
        """
        alpha = None
        if isinstance(path_or_state_dict, dict):
            state, source = path_or_state_dict, "the LoRA state dict"
        else:
            state, source = read_lora_file(path_or_state_dict), str(path_or_state_dict)
            if Path(path_or_state_dict).suffix == ".safetensors":
                alpha = peft_alpha(Path(path_or_state_dict))
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
        add_adapter(dit, adapter_name, updates, scale)
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
        elif isinstance(scales, (int, float)):
            scales = [float(scales)] * len(names)
        scales = list(scales)
        if len(scales) != len(names):
            raise ValueError(f"set_adapters got {len(names)} names and {len(scales)} scales; pass one scale per name")
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
