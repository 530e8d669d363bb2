"""The fused DiT layout of HunyuanVideo, read into the model's split layout while loading.

The model (and the official state dict) holds separate q/k/v projections: `double_blocks.N.img_attn_q/k/v`,
`txt_attn_q/k/v`, `single_blocks.N.linear1_q/k/v/mlp` and `single_blocks.N.linear2.fc`. The fused layout has:
- `double_blocks.N.img_attn_qkv` and `txt_attn_qkv`: rows q | k | v, `hidden_size` rows each;
- `single_blocks.N.linear1`: rows q | k | v | mlp (`hidden_size` rows each for q, k, v; the rest is the MLP);
- `single_blocks.N.linear2`: the `linear2.fc` of the model, unchanged.

Which released file has which layout (no key listing of the real files is public; this is what the code that
loads them shows):
- The official loader (`load_hunyuan_dit_state_dict` in hyimage/models/hunyuan/modules/hunyuanimage_dit.py) passes
  every file through `convert_hunyuan_dict_for_tensor_parallel`, which splits exactly these rows and renames
  `linear2` to `linear2.fc`; on a split file it raises inside and a bare `except` keeps the keys: it reads both.
- `dit/hunyuanimage2.1.safetensors` (base, bf16): fused. kohya-ss sd-scripts tells its users to download this file
  (docs/hunyuan_image_train_network.md) and loads it with `strict=True` and no key hook into modules named
  `img_attn_qkv`, `txt_attn_qkv`, `linear1`, `linear2` (library/hunyuan_image_modules.py).
- `dit/hunyuanimage2.1-distilled.safetensors`: split. ComfyUI issue #9799 (Tencent's distilled file) reports the
  fused keys missing and `img_attn_q/k/v`, `txt_attn_q/k/v` left over; ComfyUI only renames `_attn_qkv.`.
- `dit/*_fp8.safetensors` + `*_fp8_scale.safetensors`: split. The official FP8 path converts the split model's
  linears to FP8 first, looks each scale up by its split module name (`fp8_map[name]`), then loads the FP8 file
  strictly, so the file must carry split names (and probably its own `weight_scale`s).
- `dit/hunyuanimage-refiner.safetensors`: no public evidence either way.
So every DiT file is accepted in either layout, detected from its keys.

A split tensor is a row range of a fused one, so each split parameter is read straight from its rows in the
file: no fused tensor is ever held beside the model. Per-tensor FP8 scales of a fused module (a scale file keyed
`...img_attn_qkv` or `...linear1`, or a stored `weight_scale`) apply to each of its parts alike.
"""

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from hyimage.errors import CheckpointError
from hyimage.loading.safetensors_io import GetTensor

# fused module -> its parts in the model, in row order
_FUSED_PARTS = {
    "img_attn_qkv": ("img_attn_q", "img_attn_k", "img_attn_v"),
    "txt_attn_qkv": ("txt_attn_q", "txt_attn_k", "txt_attn_v"),
    "linear1": ("linear1_q", "linear1_k", "linear1_v", "linear1_mlp"),
    "linear2": ("linear2.fc",),
}
_FUSED = re.compile(r"^(double_blocks\.\d+)\.(img_attn_qkv|txt_attn_qkv)$|^(single_blocks\.\d+)\.(linear1|linear2)$")
_SPLIT = re.compile(
    r"^(double_blocks\.\d+)\.(?:img|txt)_attn_[qkv]$|^(single_blocks\.\d+)\.(?:linear1_(?:q|k|v|mlp)|linear2\.fc)$"
)
_BLOCK = re.compile(r"^((?:double|single)_blocks\.\d+)\.")
_ROW_PARAMS = ("weight", "bias")
SHOWN = 4

FUSED, SPLIT = "fused", "split"


def _fused_block(module: str) -> tuple[str, str] | None:
    """(block, fused module) for a fused module name, else None."""
    match = _FUSED.match(module)
    if match is None:
        return None
    block, name = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    return block, name


def split_parts(module: str, hidden_size: int) -> list[tuple[str, tuple[int, int | None] | None]]:
    """The model modules a fused module feeds, each with its row range (None: all rows); [] if not fused."""
    found = _fused_block(module)
    if found is None:
        return []
    block, name = found
    parts = _FUSED_PARTS[name]
    if len(parts) == 1:
        return [(f"{block}.{parts[0]}", None)]
    ranges = [(i * hidden_size, (i + 1) * hidden_size) for i in range(3)] + [(3 * hidden_size, None)]
    return [(f"{block}.{part}", rows) for part, rows in zip(parts, ranges)]


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")


def dit_layout(path: Path, modules: Iterable[str]) -> str:
    """FUSED or SPLIT, from the module names of a DiT file (or its FP8 scale file).

    Raises when a block holds projections of both layouts or of neither, or when blocks disagree.
    """
    modules = list(modules)
    kinds: dict[str, dict[str, list[str]]] = {}
    for module in modules:
        block = _BLOCK.match(module)
        if block is None:
            continue
        entry = kinds.setdefault(block.group(1), {FUSED: [], SPLIT: []})
        if _fused_block(module):
            entry[FUSED].append(module)
        elif _SPLIT.match(module):
            entry[SPLIT].append(module)
    for block, entry in kinds.items():
        if entry[FUSED] and entry[SPLIT]:
            raise CheckpointError(
                f"{path}: block {block} mixes the released fused layout ({_shown(entry[FUSED])}) with the split "
                f"layout ({_shown(entry[SPLIT])}); a DiT file holds one of them: re-export the file in one layout"
            )
        if not entry[FUSED] and not entry[SPLIT]:
            raise CheckpointError(
                f"{path}: block {block} has neither fused (img_attn_qkv, linear1, linear2) nor split (img_attn_q/k/v, "
                "linear1_q/k/v/mlp, linear2.fc) projections; the file is incomplete or not a HunyuanImage DiT"
            )
    by_kind = {kind: [block for block, entry in kinds.items() if entry[kind]] for kind in (FUSED, SPLIT)}
    if by_kind[FUSED] and by_kind[SPLIT]:
        raise CheckpointError(
            f"{path}: some blocks use the released fused layout ({_shown(by_kind[FUSED])}) and others the split "
            f"layout ({_shown(by_kind[SPLIT])}); a DiT file holds one of them: re-export the file in one layout"
        )
    return FUSED if by_kind[FUSED] else SPLIT


def fused_to_split(
    keys: Iterable[str], get_tensor: GetTensor, *, hidden_size: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (model key, tensor) from fused-layout keys, reading each part's rows alone; other keys unchanged.

    Weights and biases are split by rows; anything else stored on a fused module (an FP8 `weight_scale`) is
    per tensor and given to each part.
    """
    for key in keys:
        module, _, param = key.rpartition(".")
        parts = split_parts(module, hidden_size)
        if not parts:
            yield key, get_tensor(key)
            continue
        for part, rows in parts:
            by_rows = rows is not None and param in _ROW_PARAMS
            yield f"{part}.{param}", get_tensor(key, rows) if by_rows else get_tensor(key)


def split_module_names(module: str) -> list[str]:
    """The model modules named by a module of either layout (a fused one names its parts)."""
    return [part for part, _ in split_parts(module, hidden_size=0)] or [module]


def split_keys(keys: Iterable[str]) -> set[str]:
    """The model keys that fused-layout `keys` give (names only; nothing is read)."""
    out = set()
    for key in keys:
        module, _, param = key.rpartition(".")
        out.update(f"{part}.{param}" for part in split_module_names(module))
    return out
