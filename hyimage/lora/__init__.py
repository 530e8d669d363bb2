"""LoRA adapters on the DiT: kohya sd-scripts, ComfyUI and diffusers/PEFT files (`keys`), the adapter layers
(`layers`) and the pipeline methods (`mixin`). May import loading and the bottom modules; not offload or the
pipelines (the mixin tells the pipeline's memory manager through the object it is given)."""

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
