"""Key layouts of HunyuanImage-2.1 DiT files other tools write, mapped onto the model's split layout.

Facts (read from the tools' code):
- The released base file and what is made from it (sd-scripts, Comfy-Org's repackaged files, city96's GGUF
  convert tool, which keeps the source keys) use the fused HunyuanVideo layout; some released files use the
  split one (`dit_fused_keys` gives the evidence per file). Both are read, the fused rows split by
  `dit_fused_keys.split_parts`.
- ComfyUI stores a diffusion model under a prefix (`model.diffusion_model.` in checkpoints, `model.model.`
  in some saves; LoRAs use `diffusion_model.`) and, inside ComfyUI, renames the HunyuanVideo keys
  (`supported_models.HunyuanVideo.process_unet_state_dict`, also used for HunyuanImage 2.1):
  `_mod.linear.`->`_mod.lin.`, `_attn_qkv.`->`_attn.qkv.`, `mlp.fc1/2.`->`mlp.0/2.`,
  `_attn_q/k_norm.weight`->`_attn.norm.query/key_norm.scale`, `.q/k_norm.weight`->`.norm.query/key_norm.scale`,
  `_attn_proj.`->`_attn.proj.`, `.modulation.linear.`->`.modulation.lin.`, `_in.mlp.0/2.`->`_in.in/out_layer.`,
  `txt_in.{t,c}_embedder` linears -> `in_layer`/`out_layer`.
- ComfyUI FP8 files: float8_e4m3fn weights; scaled ones carry a `scaled_fp8` marker tensor and per layer
  `<layer>.scale_weight` (newer: `<layer>.weight_scale` with `<layer>.comfy_quant`), a multiplier
  (weight ~= fp8 * scale), plus optional `scale_input`/`input_scale` for FP8 activations (not needed here).

Functions here work on module names and row ranges, so the same map serves safetensors tensors, GGUF
byte rows (ggml blocks run along a row) and LoRA up-matrices.
"""

from collections.abc import Iterable, Iterator

import torch

from hyimage.loading.dit_fused_keys import fused_to_split, split_parts
from hyimage.loading.safetensors_io import GetTensor, Rows, Translate

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.model.")

# ComfyUI-internal -> official, applied to "key" strings in this order (the reverse of ComfyUI's renames).
# `mlp.0.` -> `mlp.fc1.` must not touch the official `mlp.0.` of the timestep embedders that the later rules
# recreate, so `txt_in.t_embedder`'s goes through a placeholder (MLP0/MLP2) until the end.
_COMFY_TO_OFFICIAL = (
    ("txt_in.t_embedder.in_layer.", "txt_in.t_embedder.MLP0."),
    ("txt_in.t_embedder.out_layer.", "txt_in.t_embedder.MLP2."),
    ("txt_in.c_embedder.in_layer.", "txt_in.c_embedder.linear_1."),
    ("txt_in.c_embedder.out_layer.", "txt_in.c_embedder.linear_2."),
    ("_mod.lin.", "_mod.linear."),
    ("_attn.qkv.", "_attn_qkv."),
    ("mlp.0.", "mlp.fc1."),
    ("mlp.2.", "mlp.fc2."),
    ("_attn.norm.query_norm.scale", "_attn_q_norm.weight"),
    ("_attn.norm.key_norm.scale", "_attn_k_norm.weight"),
    (".norm.query_norm.scale", ".q_norm.weight"),
    (".norm.key_norm.scale", ".k_norm.weight"),
    ("_attn.proj.", "_attn_proj."),
    (".modulation.lin.", ".modulation.linear."),
    ("_in.in_layer.", "_in.mlp.0."),
    ("_in.out_layer.", "_in.mlp.2."),
    ("MLP0.", "mlp.0."),
    ("MLP2.", "mlp.2."),
)
# Official -> ComfyUI-internal, ComfyUI's own order (process_unet_state_dict).
_OFFICIAL_TO_COMFY = (
    ("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
    ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
    ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
    ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
    ("_mod.linear.", "_mod.lin."),
    ("_attn_qkv.", "_attn.qkv."),
    ("mlp.fc1.", "mlp.0."),
    ("mlp.fc2.", "mlp.2."),
    ("_attn_q_norm.weight", "_attn.norm.query_norm.scale"),
    ("_attn_k_norm.weight", "_attn.norm.key_norm.scale"),
    (".q_norm.weight", ".norm.query_norm.scale"),
    (".k_norm.weight", ".norm.key_norm.scale"),
    ("_attn_proj.", "_attn.proj."),
    (".modulation.linear.", ".modulation.lin."),
    ("_in.mlp.2.", "_in.out_layer."),
    ("_in.mlp.0.", "_in.in_layer."),
)
_COMFY_MARKERS = ("_attn.qkv.", ".modulation.lin.", "_mod.lin.")
Piece = tuple[str, int, int]
"""(model module name, first row, end row) of a module's output rows."""


def find_prefix(keys: Iterable[str]) -> str:
    """The ComfyUI prefix most keys share, or ''."""
    keys = list(keys)
    for prefix in PREFIXES:
        if sum(key.startswith(prefix) for key in keys) > len(keys) // 2:
            return prefix
    return ""


def is_comfy_internal(keys: Iterable[str]) -> bool:
    """True when keys use ComfyUI's in-memory names (`img_attn.qkv`, `modulation.lin`) instead of the official ones."""
    return any(marker in key for key in keys for marker in _COMFY_MARKERS)


def comfy_to_official(key: str) -> str:
    """A ComfyUI-internal key (prefix removed) with the official (fused) name."""
    for old, new in _COMFY_TO_OFFICIAL:
        key = key.replace(old, new)
    return key


def official_to_comfy(key: str) -> str:
    """An official (fused-layout) key with ComfyUI's internal name."""
    for old, new in _OFFICIAL_TO_COMFY:
        key = key.replace(old, new)
    return key


def row_pieces(module: str, out_features: int, hidden_size: int) -> list[Piece]:
    """The model modules that the output rows of `module` (fused or not; `out_features` rows) feed, with their
    row ranges (`dit_fused_keys.split_parts` with the ends filled in)."""
    parts = split_parts(module, hidden_size)
    if not parts:
        return [(module, 0, out_features)]
    return [
        (part, 0, out_features) if rows is None else (part, rows[0], rows[1] or out_features) for part, rows in parts
    ]


SCALE_SUFFIX = ".weight_scale"
SCALE_KEYS = (".scale_weight", SCALE_SUFFIX)
IGNORED_SUFFIXES = (".scale_input", ".input_scale")
MARKER_KEYS = ("scaled_fp8",)


def model_keys(key: str, prefix: str, comfy: bool) -> str:
    """A file key with its prefix removed and official names; '' for keys that carry no weight."""
    if prefix:
        if not key.startswith(prefix):
            return ""
        key = key[len(prefix) :]
    if key in MARKER_KEYS or key.endswith(IGNORED_SUFFIXES) or key.endswith(".comfy_quant"):
        return ""
    return comfy_to_official(key) if comfy else key


def comfy_translate(prefix: str, comfy: bool, fused: bool, hidden_size: int) -> Translate:
    """A `safetensors_io.Translate` from a ComfyUI file (prefixed, ComfyUI-internal names, `scale_weight`) to the
    model's keys; a fused-layout file is then split by `dit_fused_keys.fused_to_split`. Markers (`scaled_fp8`),
    FP8 activation scales and `comfy_quant` descriptions are dropped; `scale_weight` becomes `weight_scale`."""

    def translate(keys: Iterable[str], get_tensor: GetTensor) -> Iterator[tuple[str, torch.Tensor]]:
        file_key: dict[str, str] = {}
        for key in keys:
            name = model_keys(key, prefix, comfy)
            if name:
                file_key[name.replace(".scale_weight", ".weight_scale") if name.endswith(".scale_weight") else name] = (
                    key
                )

        def get(name: str, rows: Rows | None = None) -> torch.Tensor:
            tensor = get_tensor(file_key[name], rows) if rows is not None else get_tensor(file_key[name])
            return tensor.reshape(()) if name.endswith(SCALE_SUFFIX) else tensor

        if fused:
            yield from fused_to_split(file_key, get, hidden_size=hidden_size)
        else:
            yield from ((name, get(name)) for name in file_key)

    return translate
