"""A tiny random Qwen2.5-VL written like the published Qwen2.5-VL-7B-Instruct (`ckpts/text_encoder/llm`).

Published layout: a flat config.json (text fields at the top level, `vision_config` nested), the legacy key names
(`model.embed_tokens`, `model.layers.*`, `model.norm`, `visual.*`, `lm_head`), sharded safetensors with
`model.safetensors.index.json`, and the Qwen2.5 tokenizer files.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from hyimage.testing.qwen_tokenizer import copy_qwen_tokenizer

VOCAB_SIZE = 152064


def tiny_config(num_hidden_layers: int = 4, hidden_size: int = 32, dtype: torch.dtype = torch.float32) -> dict:
    """A flat config.json like the published one, shrunk (head_dim 8, so mrope_section sums to 4)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden_size,
        "max_position_embeddings": 128000,
        "max_window_layers": num_hidden_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": hidden_size // 8,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": max(1, hidden_size // 16),
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2,
            "hidden_act": "silu",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "vocab_size": VOCAB_SIZE,
    }


def legacy_key(key: str) -> str:
    """transformers 5's key name -> the published (legacy) one."""
    if key.startswith("model.visual."):
        return key.removeprefix("model.")
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    return key


def random_state_dict(config: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the full vision-language model in legacy names, random and of unit-ish scale."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # deferred: heavy

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, meta in sorted(model.state_dict().items()):
        noise = torch.randn(meta.shape, generator=generator)
        if key.endswith("norm.weight") or ".norm1." in key or ".norm2." in key or ".ln_q." in key:
            value = 1.0 + 0.2 * noise
        elif meta.ndim == 1:
            value = 0.1 * noise
        else:
            value = noise / meta[0].numel() ** 0.5
        tensors[legacy_key(key)] = value.to(dtype).contiguous()
    return tensors


def write_tiny_qwen25vl(
    directory: str | Path,
    tokenizer_dir: str | Path,
    *,
    num_hidden_layers: int = 4,
    hidden_size: int = 32,
    num_shards: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a tiny random Qwen2.5-VL in the published layout, with the tokenizer files from `tokenizer_dir`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(num_hidden_layers, hidden_size, dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tensors = random_state_dict(config, seed, dtype)

    keys = list(tensors)
    shards = [keys[i::num_shards] for i in range(num_shards)]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{num_shards:05d}.safetensors"
        save_file({key: tensors[key] for key in shard}, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    copy_qwen_tokenizer(tokenizer_dir, directory)
    return directory
