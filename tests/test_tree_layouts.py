"""The pipeline on a checkpoint tree whose bf16 DiT files are in the released fused layout, and on the same tree
with them in the split layout: both load through `from_pretrained` and draw the same latents."""

from pathlib import Path

import pytest
import torch

from hyimage import HunyuanImagePipeline
from hyimage.checkpoints.layout import CheckpointLayout
from hyimage.loading.safetensors_header import read_tensor_infos
from tests.fixtures.qwen_tokenizer import build_qwen_tokenizer_once
from tests.fixtures.tiny_tree import TINY_BASE, TINY_DISTILLED, write_dit, write_tiny_tree

VARIANTS = {"hunyuanimage-v2.1": (TINY_BASE, 1), "hunyuanimage-v2.1-distilled": (TINY_DISTILLED, 2)}


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny tree (fused), and a copy of it (links) whose base and distilled files are rewritten split."""
    fused = write_tiny_tree(tmp_path_factory.mktemp("fused"), build_qwen_tokenizer_once(str(tmp_path_factory.getbasetemp())))
    split = tmp_path_factory.mktemp("split")
    for path in fused.rglob("*"):
        if path.is_file() and path.parent.name != "dit":
            (split / path.relative_to(fused)).parent.mkdir(parents=True, exist_ok=True)
            (split / path.relative_to(fused)).symlink_to(path)
    for variant, (config, seed) in VARIANTS.items():
        write_dit(CheckpointLayout(split), variant, config, seed, dit_layout="split")
    return {"fused": fused, "split": split}


@pytest.mark.slow
@pytest.mark.parametrize("model_name", VARIANTS)
def test_both_layouts_draw_the_same_latents(trees: dict[str, Path], model_name: str) -> None:
    fused = read_tensor_infos(CheckpointLayout(trees["fused"]).dit(model_name))
    split = read_tensor_infos(CheckpointLayout(trees["split"]).dit(model_name))
    assert "double_blocks.0.img_attn_qkv.weight" in fused and "single_blocks.0.linear2.weight" in fused
    assert "double_blocks.0.img_attn_q.weight" in split and "single_blocks.0.linear2.fc.weight" in split
    latents = []
    for root in trees.values():
        pipe = HunyuanImagePipeline.from_pretrained(model_name=model_name, model_root=root, memory_mode="none")
        latents.append(pipe(prompt='a sign that reads "FUSED"', width=64, height=64, num_inference_steps=2, seed=3,
                            output_type="latent"))
    assert torch.isfinite(latents[0]).all()
    assert torch.equal(latents[0], latents[1])
