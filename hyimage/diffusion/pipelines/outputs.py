"""What a pipeline call returns: `HunyuanImageOutput`, or the official single image, as the call asks."""

from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass
class HunyuanImageOutput:
    """Images of one call and what produced each: the prompt as used (after reprompting) and its seed.

    Indexable as diffusers' outputs are: `out[0]` and `out["images"]` are `out.images`."""

    images: list[Image.Image] | Any
    prompts: list[str | None]
    seeds: list[int | None]

    def to_tuple(self) -> tuple:
        return (self.images, self.prompts, self.seeds)

    def __getitem__(self, key: int | slice | str) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __len__(self) -> int:
        return 3


def call_output(
    images: Any,
    prompts: list[str | None],
    seeds: list[int | None],
    output_type: str,
    return_dict: bool | None,
    batch: int,
) -> Any:
    """The official return (a PIL image for one image, a tensor for latents) unless `return_dict` is set."""
    output = HunyuanImageOutput(images=images, prompts=prompts, seeds=seeds)
    if return_dict is None:
        if output_type == "latent":
            return images
        return images[0] if output_type == "pil" and batch == 1 else output
    return output if return_dict else output.to_tuple()
