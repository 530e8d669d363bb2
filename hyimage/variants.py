"""The released models by name: the one table every layer reads (bottom layer: imports nothing of hyimage).

A variant is a released DiT: its name (as the official code and `from_pretrained` spell it), its file stem in
the official `ckpts/dit/` layout, its constructor arguments, and, for the text-to-image variants, the official
sampling defaults. The CLI's short names, the reprompt models and the aspect-ratio presets live here too.
"""

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

BASE = "hunyuanimage-v2.1"
DISTILLED = "hunyuanimage-v2.1-distilled"
REFINER = "hunyuanimage-refiner"
TEXT_TO_IMAGE = (BASE, DISTILLED)
"""The variants a `HunyuanImagePipeline` draws with (the refiner only refines)."""

VARIANT_ALIASES = MappingProxyType({"base": BASE, "distilled": DISTILLED, BASE: BASE, DISTILLED: DISTILLED})
"""`--variant` as the CLI takes it."""

DIT_FILE_STEMS = MappingProxyType({BASE: "hunyuanimage2.1", DISTILLED: "hunyuanimage2.1-distilled",
                                   REFINER: "hunyuanimage-refiner"})

_RELEASED_DIT: dict[str, Any] = dict(
    patch_size=(1, 1), in_channels=64, out_channels=64, hidden_size=3584, heads_num=28, mlp_width_ratio=4,
    mm_double_blocks_depth=20, mm_single_blocks_depth=40, rope_dim_list=(64, 64), text_states_dim=3584,
    glyph_byT5_v2=True,
)
DIT_ARGUMENTS = MappingProxyType({
    BASE: MappingProxyType(_RELEASED_DIT),
    DISTILLED: MappingProxyType(dict(_RELEASED_DIT, guidance_embed=True, use_meanflow=True)),
    REFINER: MappingProxyType(dict(
        patch_size=(1, 1, 1), in_channels=128, out_channels=64, hidden_size=3328, heads_num=26, mlp_width_ratio=4,
        mm_double_blocks_depth=20, mm_single_blocks_depth=40, rope_dim_list=(16, 56, 56), text_states_dim=3584,
        guidance_embed=True, use_meanflow=True,
    )),
})
"""Each released DiT's constructor arguments (beyond the official defaults)."""


@dataclass(frozen=True)
class SamplingDefaults:
    """Steps, guidance scale and shift of a model variant (the official README table)."""

    num_inference_steps: int
    guidance_scale: float
    shift: float


BASE_DEFAULTS = SamplingDefaults(num_inference_steps=50, guidance_scale=3.5, shift=5)
DISTILLED_DEFAULTS = SamplingDefaults(num_inference_steps=8, guidance_scale=3.25, shift=4)

TEXT_TEMPLATES = MappingProxyType({BASE: "dit-llm-encode-v2", DISTILLED: "dit-llm-encode-v2", REFINER: "dit-llm-encode"})
"""The Qwen2.5-VL prompt template each DiT was trained with."""

REPROMPT_SIZES = MappingProxyType({"32b": "32b", "7b": "7b", "hunyuanimage-reprompt-32b": "32b",
                                   "hunyuanimage-reprompt": "7b"})
"""`reprompt_model` as accepted (ours and the official names) -> the PromptEnhancer size."""

REPROMPT_DIRS = MappingProxyType({"7b": "reprompt", "32b": "reprompt_32b"})

ASPECT_RATIOS: MappingProxyType[str, tuple[int, int]] = MappingProxyType({
    "1:1": (2048, 2048),
    "16:9": (2560, 1536),
    "9:16": (1536, 2560),
    "4:3": (2304, 1792),
    "3:4": (1792, 2304),
    "3:2": (2496, 1664),
    "2:3": (1664, 2496),
})
"""The official 2K presets (width, height)."""

ASPECT_RATIO_SEPARATORS = ("x", "X", "/", "\u00d7")
"""Also read as ':' in an aspect ratio given on the command line: `16x9`, `16X9`, `16/9`, `16×9` mean 16:9."""


def aspect_ratio_spelling(text: str) -> str:
    """`text` as the preset it spells (`16x9`, `16X9`, `16/9`, `16×9`, ` 16 : 9 ` -> '16:9'); unchanged when it
    spells none, so that the caller's check names the argument and the presets."""
    spelled = "".join(text.split())
    for separator in ASPECT_RATIO_SEPARATORS:
        spelled = spelled.replace(separator, ":")
    return spelled if spelled in ASPECT_RATIOS else text
