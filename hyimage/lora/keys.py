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

- ComfyUI's "Extract and Save Lora" (`comfy_extras/nodes_lora_extract.py`, read as `comfy/lora.py` reads it):
  `diffusion_model.<ComfyUI module path>` with fp16 `.lora_up.weight`/`.lora_down.weight` and no alpha (scale 1)
  for every weight of 2 or more dimensions (a 1x1 convolution such as `img_in.proj` gets 4-D up (out, rank, 1, 1)
  and down (rank, in, kh, kw)), `.diff` for the full difference of a 1-D weight (LayerNorm weights; all weights
  with `lora_type` "full_diff") and `.diff_b` for every bias difference, on every module, those outside the
  blocks included (`time_in.in_layer`, `txt_in.t_embedder.in_layer`, the token refiner's `self_attn.qkv`,
  `final_layer.linear`, ...). ComfyUI adds `strength * diff` to the weight and `strength * diff_b` to the bias.

A LoRA on a fused module is split by rows of B (and of a `.diff`/`.diff_b`) across the model's q/k/v(/mlp) layers,
A shared. Modules an adapter can change: linear layers (nn.Linear, FP8, GGUF), convolutions, and LayerNorms with
a learned weight (`.diff`/`.diff_b` only). The RMS q/k norms are not: ComfyUI names their weight `.scale`, which
the extractor does not write.
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
DIFF_SUFFIX = ".diff"
DIFF_BIAS_SUFFIX = ".diff_b"
_REFINER_QKV = re.compile(r"^txt_in\.individual_token_refiner\.blocks\.\d+\.self_attn_qkv$")
_FINAL_MODULATION = "final_layer.adaLN_modulation.1"

Route = tuple[str, int, int, int]
"""(model module, first source row, end source row, first row in the module): where rows of B go."""


@dataclass
class LoraUpdate:
    """One adapter's update of one model layer: delta W = up @ down (alpha already in up; rank 0 when the file has
    no low-rank pair for it) + diff, delta bias = diff_b. down is (rank, in) with in = `layer_features(...)[0]`."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers: anything with in_features/out_features and a weight (nn.Linear, FP8, GGUF)."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")
    }


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules an adapter can change: the linear layers, convolutions, and LayerNorms with a learned weight."""
    linear = linear_layers(model)
    return {name: module for name, module in model.named_modules() if name in linear or _conv_or_norm(module)}


def _conv_or_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.conv._ConvNd):
        return True
    return isinstance(module, nn.LayerNorm) and module.weight is not None


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a layer as a LoRA sees it: a convolution's inputs are in_channels x kernel."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.weight[0].numel(), layer.out_channels
    if isinstance(layer, nn.LayerNorm):
        return layer.weight.shape[0], layer.weight.shape[0]
    return layer.in_features, layer.out_features


def weight_shape_of(layer: nn.Module) -> tuple[int, ...]:
    """The shape of a layer's weight as values (a GGUF layer stores bytes: (out, in) here)."""
    if hasattr(layer, "in_features"):
        return layer.out_features, layer.in_features
    return tuple(layer.weight.shape)


def _source_modules(model: nn.Module) -> dict[str, list[Route]]:
    """Module names in the official split and fused layouts -> routes of their output rows."""
    layers = adaptable_layers(model)
    hidden = model.config.hidden_size
    sources: dict[str, list[Route]] = {name: [(name, 0, layer_features(m)[1], 0)] for name, m in layers.items()}
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
    for name, layer in adaptable_layers(model).items():
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
            out[target] = [(name, 0, layer_features(layer)[1], 0)]
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
    for kind, suffixes in (
        ("down", DOWN_SUFFIXES),
        ("up", UP_SUFFIXES),
        ("alpha", (ALPHA_SUFFIX,)),
        ("diff", (DIFF_SUFFIX,)),
        ("diff_b", (DIFF_BIAS_SUFFIX,)),
    ):
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
    layers = adaptable_layers(model)
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
    parts_of: dict[str, dict[str, list[torch.Tensor]]] = {}
    for base, parts in groups.items():
        fmt, routes = aliases[base]
        formats.add(fmt)
        full_rows = sum(end - start for _, start, end, _ in routes)
        rows = {kind: _rows(source, base, kind, parts[kind], full_rows) for kind in ("diff", "diff_b") if kind in parts}
        down, up = _low_rank(source, base, parts, default_alpha)
        if up is not None:
            rows["up"] = _rows(source, base, "up", up, full_rows)
        if not rows:
            raise ValueError(f"{source}: {base!r} has only an alpha; a LoRA module needs lora_down and lora_up")
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for module, start, end, dst in routes:
            layer = layers[module]
            module_parts = by_module.setdefault(module, {})
            for kind, tensor in rows.items():
                shape = _module_shape(layer, kind, tensor)
                if kind not in module_parts:
                    module_parts[kind] = tensor.new_zeros(shape)
                elif tuple(module_parts[kind].shape) != shape:
                    raise ValueError(f"{source}: {base!r} {kind} does not fit {module}")
                module_parts[kind][dst : dst + end - start] = tensor[start:end]
            _check_fits(source, base, module, layer, rows, down)
        for module, module_parts in by_module.items():
            collected = parts_of.setdefault(module, {})
            for kind, tensor in module_parts.items():
                collected.setdefault(kind, []).append(tensor)
            if "up" in module_parts:
                collected.setdefault("down", []).append(down)
    updates = []
    for module, collected in parts_of.items():
        inputs, outputs = layer_features(layers[module])
        down = torch.cat(collected["down"], dim=0) if "down" in collected else torch.zeros(0, inputs)
        up = torch.cat(collected["up"], dim=1) if "up" in collected else torch.zeros(outputs, 0)
        diff = sum(collected["diff"]) if "diff" in collected else None
        diff_b = sum(collected["diff_b"]) if "diff_b" in collected else None
        updates.append(LoraUpdate(module, down, up, diff, diff_b))
    return updates, formats, unmatched


def _low_rank(
    source: str, base: str, parts: dict[str, torch.Tensor], default_alpha: float | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(down (rank, in), up (out, rank) with alpha / rank folded in) of a module, 2-D (a convolution's flattened),
    or (None, None) when the file has neither matrix for it."""
    if "down" not in parts and "up" not in parts:
        return None, None
    if "down" not in parts or "up" not in parts:
        raise ValueError(f"{source}: {base!r} has no {'down (A)' if 'down' not in parts else 'up (B)'} matrix")
    down, up = parts["down"].float(), parts["up"].float()
    conv = down.ndim > 2 and up.ndim == down.ndim and all(n == 1 for n in up.shape[2:])
    if conv:
        down, up = down.flatten(1), up.flatten(1)
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"{source}: {base!r} has down {tuple(parts['down'].shape)} and up {tuple(parts['up'].shape)}; "
            "a LoRA needs down (rank, in) and up (out, rank) (a convolution's: (rank, in, *kernel), (out, rank, 1...))"
        )
    rank = down.shape[0]
    alpha = float(parts["alpha"]) if "alpha" in parts else default_alpha if default_alpha is not None else float(rank)
    return down, up * (alpha / rank)


def _rows(source: str, base: str, kind: str, tensor: torch.Tensor, full_rows: int) -> torch.Tensor:
    """`tensor` in float32, checked to have the module's `full_rows` output rows."""
    if tensor.ndim == 0 or tensor.shape[0] != full_rows:
        rows = tensor.shape[0] if tensor.ndim else 0
        raise ValueError(
            f"{source}: {base!r} ({kind}) has {rows} output rows but the DiT's layer has {full_rows}; "
            "the LoRA was made for another model or configuration"
        )
    return tensor.float()


def _module_shape(layer: nn.Module, kind: str, tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape a part of `kind` takes on `layer`: its output rows, and the source's other dimensions."""
    outputs = layer_features(layer)[1]
    return (outputs, *tensor.shape[1:])


def _check_fits(
    source: str, base: str, module: str, layer: nn.Module, rows: dict[str, torch.Tensor], down: torch.Tensor | None
) -> None:
    """Refuse parts whose shapes do not fit `layer`, naming the LoRA module and the layer."""
    inputs, _ = layer_features(layer)
    if down is not None:
        if isinstance(layer, nn.LayerNorm):
            raise ValueError(f"{source}: {base!r} is a low-rank pair on {module}, a norm; only .diff/.diff_b fit it")
        if down.shape[1] != inputs:
            raise ValueError(f"{source}: {base!r} takes {down.shape[1]} inputs but {module} has {inputs}")
    weight_shape = weight_shape_of(layer)
    if "diff" in rows and tuple(rows["diff"].shape[1:]) != weight_shape[1:]:
        raise ValueError(
            f"{source}: {base!r}.diff has shape {tuple(rows['diff'].shape)}; {module}'s weight is {weight_shape}"
        )
    if "diff_b" in rows and (rows["diff_b"].ndim != 1 or getattr(layer, "bias", None) is None):
        raise ValueError(f"{source}: {base!r}.diff_b needs a 1-D difference and a layer with a bias; {module} has none")
