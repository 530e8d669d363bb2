"""LoRA files for the HunyuanImage-2.1 DiT: the three key formats, mapped onto the model's linear layers.

Formats, as the tools write them (read from their code):
- kohya-ss sd-scripts (`networks/lora_hunyuan_image.py`, prefix `lora_unet`, flux-style `LoRAModule`):
  `lora_unet_<module path with "." -> "_">.lora_down.weight` (A, rank x in), `.lora_up.weight` (B, out x rank)
  and `.alpha` (scalar); delta W = alpha / rank * B @ A. Module paths are sd-scripts' model, the official
  fused layout: `double_blocks_0_img_attn_qkv`, `double_blocks_0_img_mlp_fc1`, `double_blocks_0_img_mod_linear`,
  `single_blocks_0_linear1` (rows q|k|v|mlp), `single_blocks_0_linear2`, `single_blocks_0_modulation_linear`.
  A `split_qkv` training still saves the fused modules.
- ComfyUI: `comfy/lora.py` maps `lora_unet_<ComfyUI module path, "." -> "_">` and the generic
  `diffusion_model.<ComfyUI module path>` to its model, with `.lora_up/.lora_down` (or diffusers-style
  `.lora_B/.lora_A`) and `.alpha` (delta W = alpha / rank * up @ down). ComfyUI's module paths rename
  the official ones (`img_mlp.0/2`, `img_mod.lin`, `img_attn.qkv`, `img_attn.proj`, `modulation.lin`; see
  `hyimage.loading.dit_layouts`); sd-scripts' `networks/convert_hunyuan_image_lora_to_comfy.py` rewrites
  `img_mlp_fc1/fc2` -> `img_mlp_0/2`, `img_mod_linear` -> `img_mod_lin`, `modulation_linear` -> `modulation_lin`.
- diffusers/PEFT: `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` (PEFT: `base_model.model.`),
  modules named as in diffusers' HunyuanImageTransformer2DModel (`hyimage.loading.dit_diffusers_keys`): split
  q/k/v (`attn.to_q`, `attn.add_q_proj`, `proj_mlp`, ...), the token refiner's `attn.to_q/k/v` being rows
  of the model's fused `self_attn_qkv`, and `norm_out.linear` holding (scale, shift) where the model has
  (shift, scale). No alpha is stored (alpha = rank unless an `.alpha` key is present).

A LoRA on a fused module is split by rows of B across the model's q/k/v(/mlp) layers, A shared.
Not verified on real files (none can be downloaded here): LoRAs on the refiner and ByT5 mapper, and
ComfyUI's names for `byt5_in` (taken to be the official ones).
"""

import re
from dataclasses import dataclass

import torch
from torch import nn

from hyimage.loading.dit_diffusers_keys import diffusers_module_name
from hyimage.loading.dit_layouts import official_to_comfy, row_pieces

DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight")
UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight", ".lora_B.default.weight")
ALPHA_SUFFIX = ".alpha"
_REFINER_QKV = re.compile(r"^txt_in\.individual_token_refiner\.blocks\.\d+\.self_attn_qkv$")
_FINAL_MODULATION = "final_layer.adaLN_modulation.1"

Route = tuple[str, int, int, int]
"""(model module, first source row, end source row, first row in the module): where rows of B go."""


@dataclass
class LoraUpdate:
    """One adapter's low-rank update of one model linear layer: delta W = up @ down (alpha already in up)."""

    module: str
    down: torch.Tensor
    up: torch.Tensor


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules LoRA can target: anything with in_features/out_features and a weight (nn.Linear, FP8, GGUF)."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")
    }


def _source_modules(model: nn.Module) -> dict[str, list[Route]]:
    """Module names in the official split and fused layouts -> routes of their output rows."""
    layers = linear_layers(model)
    hidden = model.config.hidden_size
    sources: dict[str, list[Route]] = {name: [(name, 0, m.out_features, 0)] for name, m in layers.items()}
    for i in range(len(model.double_blocks)):
        for stream in ("img", "txt"):
            fused = f"double_blocks.{i}.{stream}_attn_qkv"
            sources[fused] = [(p, s, e, 0) for p, s, e in row_pieces(fused, 3 * hidden, hidden)]
    for i, block in enumerate(model.single_blocks):
        for fused, out in (
            (f"single_blocks.{i}.linear1", 3 * hidden + block.linear1_mlp.out_features),
            (f"single_blocks.{i}.linear2", hidden),
        ):
            sources[fused] = [(p, s, e, 0) for p, s, e in row_pieces(fused, out, hidden)]
    return sources


def _diffusers_modules(model: nn.Module) -> dict[str, list[Route]]:
    """diffusers module names -> routes into the model."""
    hidden = model.config.hidden_size
    out: dict[str, list[Route]] = {}
    for name, layer in linear_layers(model).items():
        if _REFINER_QKV.match(name):
            head = name.replace(
                "txt_in.individual_token_refiner.blocks.", "context_embedder.token_refiner.refiner_blocks."
            )
            head = head[: -len("self_attn_qkv")] + "attn.to_"
            for i, part in enumerate("qkv"):
                out[head + part] = [(name, 0, hidden, i * hidden)]
            continue
        target = diffusers_module_name(name)
        if name == _FINAL_MODULATION:
            out[target] = [(name, 0, hidden, hidden), (name, hidden, 2 * hidden, 0)]
        else:
            out[target] = [(name, 0, layer.out_features, 0)]
    return out


def lora_aliases(model: nn.Module) -> dict[str, tuple[str, list[Route]]]:
    """Every module name a LoRA file may use -> (format, routes into the model)."""
    aliases: dict[str, tuple[str, list[Route]]] = {}
    for name, routes in _source_modules(model).items():
        comfy = official_to_comfy(name + ".")[:-1]
        aliases[name] = ("official", routes)
        for module in (name, comfy):
            aliases.setdefault(
                "lora_unet_" + module.replace(".", "_"), ("kohya" if module == name else "comfyui", routes)
            )
            aliases.setdefault("diffusion_model." + module, ("comfyui", routes))
    for name, routes in _diffusers_modules(model).items():
        for prefix in ("transformer.", "base_model.model.", ""):
            aliases.setdefault(prefix + name, ("diffusers", routes))
    return aliases


def _split_key(key: str) -> tuple[str, str] | None:
    for kind, suffixes in (("down", DOWN_SUFFIXES), ("up", UP_SUFFIXES), ("alpha", (ALPHA_SUFFIX,))):
        for suffix in suffixes:
            if key.endswith(suffix):
                return key[: -len(suffix)], kind
    return None


def parse_lora(
    state_dict: dict[str, torch.Tensor],
    model: nn.Module,
    *,
    strict: bool = True,
    source: str = "the LoRA",
    default_alpha: float | None = None,
) -> tuple[list[LoraUpdate], set[str], list[str]]:
    """The updates a LoRA state dict makes to `model`'s layers, the formats seen, and the keys left unused.

    A module without an `.alpha` key takes `default_alpha` (PEFT's lora_alpha from the file's metadata), else
    its rank (scale 1). Raises ValueError naming the keys that match no layer when `strict` (the default).
    """
    aliases = lora_aliases(model)
    layers = linear_layers(model)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        split = _split_key(key)
        if split is None or split[0] not in aliases:
            unmatched.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = tensor
    if unmatched and strict:
        shown = ", ".join(unmatched[:8]) + (", ..." if len(unmatched) > 8 else "")
        raise ValueError(
            f"{source}: {len(unmatched)} keys match no layer of the DiT: {shown}. Is it a LoRA for "
            "HunyuanImage-2.1 (kohya sd-scripts, ComfyUI or diffusers format)? Pass strict=False to skip them."
        )
    formats: set[str] = set()
    per_module: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for base, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise ValueError(f"{source}: {base!r} has no {'down (A)' if 'down' not in parts else 'up (B)'} matrix")
        down, up = parts["down"].float(), parts["up"].float()
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"{source}: {base!r} has down {tuple(down.shape)} and up {tuple(up.shape)}; "
                "a linear LoRA needs down (rank, in) and up (out, rank)"
            )
        rank = down.shape[0]
        alpha = (
            float(parts["alpha"]) if "alpha" in parts else default_alpha if default_alpha is not None else float(rank)
        )
        up = up * (alpha / rank)
        fmt, routes = aliases[base]
        formats.add(fmt)
        full_rows = sum(end - start for _, start, end, _ in routes)
        if full_rows != up.shape[0]:
            raise ValueError(
                f"{source}: {base!r} has {up.shape[0]} output rows but the DiT's layer has {full_rows}; "
                "the LoRA was made for another model or configuration"
            )
        by_module: dict[str, torch.Tensor] = {}
        for module, start, end, dst in routes:
            layer = layers[module]
            if down.shape[1] != layer.in_features:
                raise ValueError(
                    f"{source}: {base!r} takes {down.shape[1]} inputs but {module} has {layer.in_features}"
                )
            if module not in by_module:
                by_module[module] = up.new_zeros(layer.out_features, rank)
            by_module[module][dst : dst + end - start] = up[start:end]
        for module, module_up in by_module.items():
            downs, ups = per_module.setdefault(module, ([], []))
            downs.append(down)
            ups.append(module_up)
    updates = [
        LoraUpdate(module, torch.cat(downs, dim=0), torch.cat(ups, dim=1))
        for module, (downs, ups) in per_module.items()
    ]
    return updates, formats, unmatched
