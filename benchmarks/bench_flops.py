"""FLOPs of one full-size 2K forward of the distilled DiT, counted, against the useful work done.

The model is built and run under `FakeTensorMode` (shapes only, no memory, no arithmetic) and
`torch.utils.flop_counter.FlopCounterMode` counts the matrix products and attention. The prompt as the
pipeline receives it: Qwen states padded to 1000 positions with `--text-valid` valid, ByT5 states padded to 128
with `--glyph-valid` valid, a 2048x2048 image (64x64 latent tokens), batch 1. The masks and per-call constants
are built from real masks before entering fake mode (reading a mask is data-dependent).
- trimmed: the states cut by `trim_padding`, as HunyuanImagePipeline feeds the DiT.
- padded: all 1000 + 128 positions (what the official and diffusers pipelines compute).
- useful: an analytic count over image tokens + valid text + valid glyph tokens only (below, `useful_flops`).

    python benchmarks/bench_flops.py [--text-valid 100] [--glyph-valid 10] [--variant hunyuanimage-v2.1-distilled]
"""

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count  # noqa: E402

from hyimage.diffusion.padding import trim_padding  # noqa: E402
from hyimage.models import HYImageDiffusionTransformer  # noqa: E402
from hyimage.models.dit.configs import resolve_dit_config  # noqa: E402
from hyimage.models.dit.model import CallConstants  # noqa: E402

TEXT_POSITIONS, GLYPH_POSITIONS, BYT5_DIM = 1000, 128, 1472
LATENT_SIZE = 64  # 2048 / 32


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The CPU flash kernel does the same products as the CUDA ones (FlopCounterMode has no formula for it)."""
    return sdpa_flop_count(query, key, value)  # shapes


def linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def useful_flops(config, image_tokens: int, text: int, glyph: int) -> int:
    """Matrix products on valid tokens only (batch 1), adaLN and embedders included."""
    d, mlp = config.hidden_size, int(config.hidden_size * config.mlp_width_ratio)
    embedder = linear(1, 256, d) + linear(1, d, d)
    flops = linear(image_tokens, config.in_channels, d)  # patch embedding (1x1 patches)
    flops += embedder * (1 + bool(config.use_meanflow) + bool(config.guidance_embed))
    # text refiner: projection, pooled condition, timestep, 2 blocks of attention + SiLU MLP on the valid text
    flops += linear(text, config.text_states_dim, d) + linear(1, config.text_states_dim, d) + linear(1, d, d)
    flops += embedder
    flops += 2 * (linear(1, d, 2 * d) + linear(text, d, 4 * d) + linear(text, d, 2 * mlp) + 4 * text * text * d)
    if config.glyph_byT5_v2:
        flops += linear(glyph, BYT5_DIM, 2048) + linear(glyph, 2048, 2048) + linear(glyph, 2048, d)
    tokens = image_tokens + text + glyph
    attention = 4 * tokens * tokens * d
    double = 2 * linear(1, d, 6 * d) + linear(tokens, d, 4 * d) + linear(tokens, d, 2 * mlp) + attention
    single = linear(1, d, 3 * d) + linear(tokens, d, 3 * d + mlp) + linear(tokens, d + mlp, d) + attention
    flops += config.mm_double_blocks_depth * double + config.mm_single_blocks_depth * single
    out = config.out_channels
    flops += linear(1, d, 2 * d) + linear(image_tokens, d, out)
    return flops


def counted_flops(variant: str, text_valid: int, glyph_valid: int, trim: bool) -> int:
    config = resolve_dit_config(variant)
    text_mask = (torch.arange(TEXT_POSITIONS) < text_valid).long()[None]
    glyph_mask = (torch.arange(GLYPH_POSITIONS) < glyph_valid).long()[None]
    text_len, glyph_len = TEXT_POSITIONS, GLYPH_POSITIONS
    if trim:
        text_len = trim_padding(text_mask[..., None], text_mask)[1].shape[1]
        glyph_len = trim_padding(glyph_mask[..., None], glyph_mask)[1].shape[1]
        text_mask, glyph_mask = text_mask[:, :text_len], glyph_mask[:, :glyph_len]
    grid = (LATENT_SIZE, LATENT_SIZE)
    constants = CallConstants.build(config, grid, text_mask, glyph_mask, torch.device("cpu"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = HYImageDiffusionTransformer.from_config(config, dtype=torch.bfloat16, device="cpu")
        model._constants = constants
        latents = torch.randn(1, config.in_channels, *grid, dtype=torch.bfloat16)
        text = torch.randn(1, text_len, config.text_states_dim, dtype=torch.bfloat16)
        glyph = torch.randn(1, glyph_len, BYT5_DIM, dtype=torch.bfloat16)
        times = torch.tensor([700.0])
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(
                latents, times, text, text_mask,
                byt5_text_states=glyph, byt5_text_mask=glyph_mask, guidance=times, timesteps_r=times,
            )
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="hunyuanimage-v2.1-distilled")
    parser.add_argument("--text-valid", type=int, default=100)
    parser.add_argument("--glyph-valid", type=int, default=10)
    args = parser.parse_args()
    config = resolve_dit_config(args.variant)
    useful = useful_flops(config, LATENT_SIZE**2, args.text_valid, args.glyph_valid if config.glyph_byT5_v2 else 0)
    print(f"{args.variant}, 2048x2048 ({LATENT_SIZE ** 2} image tokens), text {args.text_valid}/{TEXT_POSITIONS}, "
          f"glyph {args.glyph_valid}/{GLYPH_POSITIONS} valid, batch 1")
    print(f"{'forward':<10}{'FLOPs':>12}{'/ useful':>10}")
    print(f"{'useful':<10}{useful:>12.4e}{1:>10.3f}")
    for name, trim in (("trimmed", True), ("padded", False)):
        flops = counted_flops(args.variant, args.text_valid, args.glyph_valid, trim)
        print(f"{name:<10}{flops:>12.4e}{flops / useful:>10.3f}")


if __name__ == "__main__":
    main()
