"""ComfyUI single-file DiTs: `diffusion_model.`-prefixed, fused layout, FP8 with `scale_weight` or a plain cast."""

from pathlib import Path

import torch
from safetensors.torch import save_file

from hyimage.models import HYImageDiffusionTransformer
from hyimage.quantization.fp8 import FP8Linear
from tests.fixtures.dit_layouts import COMFY_NAMES, fused_layout, split_by_hand
from tests.fixtures.dit_loading import TINY, run, tiny_dit, tiny_inputs
from tests.fixtures.numerics import max_rel_error

load_dit = HYImageDiffusionTransformer.from_single_file

E4M3 = torch.float8_e4m3fn


def is_block_linear(key: str, tensor: torch.Tensor) -> bool:
    return "blocks." in key and "individual" not in key and key.endswith(".weight") and tensor.ndim == 2


def test_scaled_fp8_file_with_prefix_loads_fp8(tmp_path: Path) -> None:
    """A ComfyUI `*_fp8_e4m3fn_scaled` file: `scaled_fp8` marker, `<layer>.scale_weight`, bf16 elsewhere."""
    model = tiny_dit()
    stored, file = {}, {"diffusion_model.scaled_fp8": torch.empty(0, dtype=E4M3)}
    for key, tensor in fused_layout(model.state_dict()).items():
        if is_block_linear(key, tensor):
            scale = tensor.abs().max() / 448
            fp8 = (tensor / scale).to(E4M3)
            file[f"diffusion_model.{key}"] = fp8
            file[f"diffusion_model.{key[: -len('weight')]}scale_weight"] = scale.reshape(1)
            stored[key] = fp8.float() * scale
        else:
            file[f"diffusion_model.{key}"] = tensor.to(torch.bfloat16)
            stored[key] = tensor.to(torch.bfloat16).float()
    path = tmp_path / "hunyuanimage2.1_fp8_e4m3fn_scaled.safetensors"
    save_file(file, str(path))

    loaded = HYImageDiffusionTransformer.from_single_file(path, TINY, dtype=torch.float32)
    fp8_layers = {name for name, m in loaded.named_modules() if isinstance(m, FP8Linear)}
    assert {"double_blocks.0.img_attn_q", "double_blocks.0.img_attn_v", "single_blocks.1.linear1_mlp"} <= fp8_layers
    assert loaded.double_blocks[0].img_attn_k.weight.dtype == E4M3
    reference = HYImageDiffusionTransformer(**TINY).eval()
    reference.load_state_dict(split_by_hand(stored, TINY["hidden_size"]))
    inputs = tiny_inputs()
    assert max_rel_error(run(loaded, inputs), run(reference, inputs)) <= 1e-5


def test_plain_fp8_cast_in_comfy_names(tmp_path: Path) -> None:
    """A plain `fp8_e4m3fn` cast (no scales) saved with ComfyUI's in-memory names and `model.diffusion_model.`."""
    model = tiny_dit()
    stored, file = {}, {}
    for key, tensor in fused_layout(model.state_dict()).items():
        comfy = key
        for old, new in COMFY_NAMES.items():
            comfy = comfy.replace(old, new)
        cast = is_block_linear(key, tensor) or key == "img_in.proj.weight"  # a conv weight in FP8 too
        value = tensor.to(E4M3) if cast else tensor
        file["model.diffusion_model." + comfy] = value
        stored[key] = value.float()
    path = tmp_path / "hunyuanimage2.1_fp8_e4m3fn.safetensors"
    save_file(file, str(path))
    loaded = load_dit(path, TINY, dtype=torch.float32)
    assert isinstance(loaded.single_blocks[0].linear2.fc, FP8Linear)
    assert loaded.img_in.proj.weight.dtype == torch.float32
    reference = HYImageDiffusionTransformer(**TINY).eval()
    reference.load_state_dict(split_by_hand(stored, TINY["hidden_size"]))
    inputs = tiny_inputs()
    assert max_rel_error(run(loaded, inputs), run(reference, inputs)) <= 1e-5


def test_other_comfy_quant_formats_are_refused_by_name(tmp_path: Path) -> None:
    import json

    import pytest

    from hyimage.errors import CheckpointError

    file = {f"diffusion_model.{k}": v for k, v in fused_layout(tiny_dit().state_dict()).items()}
    config = json.dumps({"format": "nvfp4"}).encode()
    file["diffusion_model.double_blocks.0.img_attn_qkv.comfy_quant"] = torch.tensor(list(config), dtype=torch.uint8)
    path = tmp_path / "nvfp4.safetensors"
    save_file(file, str(path))
    with pytest.raises(CheckpointError, match="nvfp4"):
        load_dit(path, TINY)


def test_scaled_fp8_file_with_fp8_embedders_runs(tmp_path: Path) -> None:
    """A ComfyUI scaled FP8 file that stores every linear outside the blocks as float8 too (time_in, time_r_in,
    guidance_in, txt_in, final_layer): the timestep features are computed in the model's dtype, not float8."""
    model = tiny_dit()
    stored, file = {}, {"diffusion_model.scaled_fp8": torch.empty(0, dtype=E4M3)}
    for key, tensor in fused_layout(model.state_dict()).items():
        if key.endswith(".weight") and tensor.ndim == 2 and not key.startswith("byt5_in."):
            scale = tensor.abs().max() / 448
            fp8 = (tensor / scale).to(E4M3)
            file[f"diffusion_model.{key}"] = fp8
            file[f"diffusion_model.{key[: -len('weight')]}scale_weight"] = scale.reshape(1)
            stored[key] = fp8.float() * scale
        else:
            file[f"diffusion_model.{key}"] = tensor
            stored[key] = tensor
    path = tmp_path / "hunyuanimage2.1_distilled_fp8_e4m3fn_scaled.safetensors"
    save_file(file, str(path))
    loaded = load_dit(path, TINY, dtype=torch.float32)
    for name in ("time_in.mlp.0", "time_r_in.mlp.0", "guidance_in.mlp.0", "txt_in.t_embedder.mlp.0"):
        assert isinstance(loaded.get_submodule(name), FP8Linear), name
    reference = HYImageDiffusionTransformer(**TINY).eval()
    reference.load_state_dict(split_by_hand(stored, TINY["hidden_size"]))
    inputs = tiny_inputs()
    assert max_rel_error(run(loaded, inputs), run(reference, inputs)) <= 1e-5
