"""Seconds per denoising step on the CPU: hyimage against diffusers' HunyuanImageTransformer2DModel, same weights.

A mid-size distilled DiT (the real text and glyph widths, fewer and narrower blocks) on a realistic prompt as the
pipelines feed it: the Qwen states padded to 1000 positions with about 100 valid, the ByT5 states padded to 128
with about 10 valid, a 1024x1024 image (32x32 latent tokens), batch 1, guidance and MeanFlow inputs.
- hyimage: one step of HunyuanImagePipeline: the padding cut (`trim_padding`, once per call in the pipeline,
  counted here at every step) and the DiT forward.
- hyimage, padded: the same forward on the padded states (what trimming saves).
- hyimage, unfused: as "hyimage", the q|k|v (q|k|v|mlp) projections run as three or four matmuls on the same
  weights (the path before hyimage/models/dit/fused.py; what fusing saves).
- diffusers: its pipeline passes the padded states (1000 + 128 positions) to the transformer.
Steps alternate between the implementations; the median of `--repeats` steps after one warm-up each is printed,
with the ratio to diffusers, for float32 and bfloat16.

    python benchmarks/bench_step_cpu.py [--threads 2] [--repeats 3] [--hidden 512] [--heads 4] [--double 2] [--single 4]
"""

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from projections import projection_paths, split_projections  # noqa: E402

from hyimage.diffusion.padding import trim_padding  # noqa: E402
from hyimage.models import HYImageDiffusionTransformer  # noqa: E402
from hyimage.models.dit.configs import DIT_CONFIGS  # noqa: E402
from hyimage.models.dit.fused import PLAIN  # noqa: E402
from tests.fixtures.diffusers_dit import diffusers_twin  # noqa: E402

TEXT_POSITIONS, TEXT_VALID = 1000, 100
GLYPH_POSITIONS, GLYPH_VALID = 128, 10
LATENT_SIZE = 32


def build(args: argparse.Namespace) -> tuple[HYImageDiffusionTransformer, torch.nn.Module]:
    config = replace(
        DIT_CONFIGS["hunyuanimage-v2.1-distilled"],
        hidden_size=args.hidden,
        heads_num=args.heads,
        mm_double_blocks_depth=args.double,
        mm_single_blocks_depth=args.single,
        rope_dim_list=(args.hidden // args.heads // 2,) * 2,
    )
    torch.manual_seed(0)
    ours = HYImageDiffusionTransformer(**config.to_dict()).eval()
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_(0, 0.02)
    return ours, diffusers_twin(ours)  # the tests' independent reference, same weights


def inputs(config, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    text_mask = (torch.arange(TEXT_POSITIONS) < TEXT_VALID).long()[None]
    glyph_mask = (torch.arange(GLYPH_POSITIONS) < GLYPH_VALID).long()[None]
    return dict(
        latents=torch.randn(1, config.in_channels, LATENT_SIZE, LATENT_SIZE, generator=g).to(dtype),
        timestep=torch.tensor([700.0]),
        timestep_r=torch.tensor([600.0]),
        guidance=torch.tensor([3250.0]),
        text=torch.randn(1, TEXT_POSITIONS, config.text_states_dim, generator=g).to(dtype),
        text_mask=text_mask,
        glyph=torch.randn(1, GLYPH_POSITIONS, 1472, generator=g).to(dtype),
        glyph_mask=glyph_mask,
    )


def step_ours(model: torch.nn.Module, x: dict, trim: bool) -> torch.Tensor:
    text, text_mask, glyph, glyph_mask = x["text"], x["text_mask"], x["glyph"], x["glyph_mask"]
    if trim:
        text, text_mask = trim_padding(text, text_mask)
        glyph, glyph_mask = trim_padding(glyph, glyph_mask)
    return model(
        x["latents"], x["timestep"], text, text_mask,
        byt5_text_states=glyph, byt5_text_mask=glyph_mask, guidance=x["guidance"], timesteps_r=x["timestep_r"],
    )


def unfused_step(model: torch.nn.Module, x: dict) -> torch.Tensor:
    with split_projections():
        return step_ours(model, x, trim=True)


def step_diffusers(model: torch.nn.Module, x: dict) -> torch.Tensor:
    dtype = x["latents"].dtype  # its pipeline passes the times in the latents' dtype
    return model(
        hidden_states=x["latents"], timestep=x["timestep"].to(dtype), encoder_hidden_states=x["text"],
        encoder_attention_mask=x["text_mask"], encoder_hidden_states_2=x["glyph"],
        encoder_attention_mask_2=x["glyph_mask"], guidance=x["guidance"].to(dtype),
        timestep_r=x["timestep_r"].to(dtype), return_dict=False,
    )[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, theirs = build(args)
    print(f"DiT hidden {args.hidden}, {args.heads} heads, {args.double} double + {args.single} single blocks; "
          f"{LATENT_SIZE ** 2} image tokens, text {TEXT_VALID}/{TEXT_POSITIONS}, glyph {GLYPH_VALID}/{GLYPH_POSITIONS}"
          f" valid; {args.threads} threads, median of {args.repeats}")
    print(f"{'dtype':<10}{'implementation':<20}{'s/step':>9}{'vs diffusers':>14}{'max|diff|/max':>15}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours.to(dtype)
        assert projection_paths(ours) == {PLAIN}  # packed again after .to()
        theirs.to(dtype)
        x = inputs(ours.config, dtype)
        runs = {
            "hyimage": lambda: step_ours(ours, x, trim=True),
            "hyimage, padded": lambda: step_ours(ours, x, trim=False),
            "hyimage, unfused": lambda: unfused_step(ours, x),
            "diffusers": lambda: step_diffusers(theirs, x),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        outputs = {}
        with torch.inference_mode():
            for name, run in runs.items():
                outputs[name] = run().float()  # warm-up
            for _ in range(args.repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
        reference = outputs["diffusers"]
        base = statistics.median(times["diffusers"])
        for name in runs:
            seconds = statistics.median(times[name])
            error = ((outputs[name] - reference).abs().max() / reference.abs().max()).item()
            print(f"{dtype_name:<10}{name:<20}{seconds:>9.3f}{seconds / base:>13.2f}x{error:>15.2e}")
        ratios = [fused / parts for fused, parts in zip(times["hyimage"], times["hyimage, unfused"])]
        print(f"{dtype_name:<10}fused / unfused, step by step: median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
