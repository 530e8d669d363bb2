"""LoRA adapters on the DiT: kohya sd-scripts, ComfyUI and diffusers/PEFT files."""

from hyimage.lora.keys import parse_lora
from hyimage.lora.layers import add_adapter, fuse, remove_adapters, set_scales, unfuse
from hyimage.lora.mixin import LoraMixin, read_lora_file

__all__ = [
    "LoraMixin",
    "add_adapter",
    "fuse",
    "parse_lora",
    "read_lora_file",
    "remove_adapters",
    "set_scales",
    "unfuse",
]
