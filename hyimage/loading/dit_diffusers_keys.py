"""Key map between the official DiT state dict and diffusers' `HunyuanImageTransformer2DModel`.

Facts from diffusers' `scripts/convert_hunyuan_image_to_diffusers.py`: most tensors are renamed one to one;
the token refiner's fused `self_attn_qkv` is three diffusers tensors `attn.to_q/to_k/to_v`; and the final
layer's modulation is (shift, scale) in the official layout but (scale, shift) in diffusers.
"""

import re
from collections.abc import Callable, Iterable, Iterator

import torch

# Official module path -> diffusers module path, outside the repeated blocks.
_TOP_LEVEL = {
    "byt5_in.layernorm": "context_embedder_2.norm",
    "byt5_in.fc1": "context_embedder_2.linear_1",
    "byt5_in.fc2": "context_embedder_2.linear_2",
    "byt5_in.fc3": "context_embedder_2.linear_3",
    "img_in.proj": "x_embedder.proj",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "time_in.mlp.0": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_guidance_embed.timestep_embedder.linear_2",
    "time_r_in.mlp.0": "time_guidance_embed.timestep_embedder_r.linear_1",
    "time_r_in.mlp.2": "time_guidance_embed.timestep_embedder_r.linear_2",
    "guidance_in.mlp.0": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.mlp.2": "time_guidance_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}

_REFINER_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "self_attn_proj": "attn.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm_out.linear",
}

_DOUBLE_BLOCK = {
    "img_mod.linear": "norm1.linear",
    "img_attn_q": "attn.to_q",
    "img_attn_k": "attn.to_k",
    "img_attn_v": "attn.to_v",
    "img_attn_q_norm": "attn.norm_q",
    "img_attn_k_norm": "attn.norm_k",
    "img_attn_proj": "attn.to_out.0",
    "img_mlp.fc1": "ff.net.0.proj",
    "img_mlp.fc2": "ff.net.2",
    "txt_mod.linear": "norm1_context.linear",
    "txt_attn_q": "attn.add_q_proj",
    "txt_attn_k": "attn.add_k_proj",
    "txt_attn_v": "attn.add_v_proj",
    "txt_attn_q_norm": "attn.norm_added_q",
    "txt_attn_k_norm": "attn.norm_added_k",
    "txt_attn_proj": "attn.to_add_out",
    "txt_mlp.fc1": "ff_context.net.0.proj",
    "txt_mlp.fc2": "ff_context.net.2",
}

_SINGLE_BLOCK = {
    "modulation.linear": "norm.linear",
    "linear1_q": "attn.to_q",
    "linear1_k": "attn.to_k",
    "linear1_v": "attn.to_v",
    "q_norm": "attn.norm_q",
    "k_norm": "attn.norm_k",
    "linear1_mlp": "proj_mlp",
    "linear2.fc": "proj_out",
}

# (official block list, diffusers block list, module map inside one block)
_BLOCKS = (
    ("txt_in.individual_token_refiner.blocks", "context_embedder.token_refiner.refiner_blocks", _REFINER_BLOCK),
    ("double_blocks", "transformer_blocks", _DOUBLE_BLOCK),
    ("single_blocks", "single_transformer_blocks", _SINGLE_BLOCK),
)

_REFINER_QKV = re.compile(r"^txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn_qkv\.(weight|bias)$")
_DIFFUSERS_REFINER_QKV = re.compile(
    r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_([qkv])\.(weight|bias)$"
)
_FINAL_MODULATION = ("final_layer.adaLN_modulation.1", "norm_out.linear")
_DIFFUSERS_ROOTS = ("x_embedder.", "context_embedder.", "transformer_blocks.", "single_transformer_blocks.")


def _rename(key: str, to_diffusers: bool) -> str:
    """Rename a one-to-one key; keys the map does not know come back unchanged."""
    module, _, param = key.rpartition(".")
    src, dst = (0, 1) if to_diffusers else (1, 0)
    for entry in _TOP_LEVEL.items():
        if module == entry[src]:
            return f"{entry[dst]}.{param}"
    for block in _BLOCKS:
        head = block[src] + "."
        if not module.startswith(head):
            continue
        index, _, inner = module[len(head) :].partition(".")
        for entry in block[2].items():
            if inner == entry[src]:
                return f"{block[dst]}.{index}.{entry[dst]}.{param}"
    return key


def diffusers_module_name(official: str) -> str:
    """The diffusers name of an official (split-layout) module; unknown names come back unchanged."""
    return _rename(official + ".weight", to_diffusers=True)[: -len(".weight")]


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: official (shift, scale) <-> diffusers (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def official_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official DiT state dict in diffusers' key layout (new tensors where they are split or reordered)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        qkv = _REFINER_QKV.match(key)
        if qkv:
            index, param = qkv.groups()
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"context_embedder.token_refiner.refiner_blocks.{index}.attn.to_{name}.{param}"] = part.clone()
            continue
        new_key = _rename(key, to_diffusers=True)
        if key.rpartition(".")[0] == _FINAL_MODULATION[0]:
            tensor = _swap_halves(tensor)
        out[new_key] = tensor
    return out


def diffusers_to_official(
    keys: Iterable[str], get_tensor: Callable[[str], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (official key, tensor) one at a time from diffusers-layout keys, reading only what each needs.

    Keys the map does not know are yielded unchanged, so a strict loader reports them as unexpected.
    """
    keys = list(keys)
    present = set(keys)
    for key in keys:
        qkv = _DIFFUSERS_REFINER_QKV.match(key)
        if qkv:
            index, name, param = qkv.groups()
            parts = [f"context_embedder.token_refiner.refiner_blocks.{index}.attn.to_{n}.{param}" for n in "qkv"]
            missing = [part for part in parts if part not in present]
            if missing:
                raise KeyError(f"diffusers checkpoint lacks {missing}, needed for the token refiner's fused qkv")
            if name == "q":  # to_k and to_v are read together with to_q
                fused = torch.cat([get_tensor(part) for part in parts], dim=0)
                yield f"txt_in.individual_token_refiner.blocks.{index}.self_attn_qkv.{param}", fused
            continue
        tensor = get_tensor(key)
        if key.rpartition(".")[0] == _FINAL_MODULATION[1]:
            tensor = _swap_halves(tensor)
        yield _rename(key, to_diffusers=False), tensor


def is_diffusers_layout(keys: Iterable[str]) -> bool:
    """True when the keys look like diffusers' HunyuanImageTransformer2DModel rather than the official DiT."""
    return any(key.startswith(_DIFFUSERS_ROOTS) for key in keys)
