"""Seconds per step, TFLOP/s and MFU of the full-size distilled DiT at 2K on one CUDA GPU: bf16, FP8 with
weight-only dequantisation, FP8 through torch._scaled_mm, each eager and with compiled blocks; bf16 and FP8
dequant eager also with the q|k|v (q|k|v|mlp) projections split (`split`: three or four GEMMs, the path before
hyimage/models/dit/fused.py; compiled blocks always run them split).

One step is one forward as HunyuanImagePipeline runs it: batch 1, 2048x2048 (64x64 latent tokens), the prompt
padded to 1000 Qwen positions with `--text-valid` valid and 128 ByT5 positions with `--glyph-valid` valid, cut
by `trim_padding`. Random weights. FLOPs are the useful work of that forward (`bench_flops.useful_flops`, equal
to FlopCounterMode's count of the trimmed forward); MFU divides TFLOP/s by the GPU's dense bf16 peak
(`--peak-tflops`, default from the device name; FP8 rows are also measured against bf16 peak).

    python benchmarks/bench_step_gpu.py [--steps 5] [--text-valid 100] [--glyph-valid 10] [--no-compile]

Needs CUDA and a GPU with about 40 GB (bf16 weights); without CUDA it says so and exits 0.
"""

import argparse
import contextlib
import gc
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_flops import BYT5_DIM, GLYPH_POSITIONS, LATENT_SIZE, TEXT_POSITIONS, useful_flops  # noqa: E402
from projections import split_projections  # noqa: E402

from hyimage.diffusion.padding import trim_padding  # noqa: E402
from hyimage.models.dit.configs import resolve_dit_config  # noqa: E402
from hyimage.models.dit.model import HYImageDiffusionTransformer  # noqa: E402
from hyimage.quantization.fp8 import convert_to_fp8_linear, fp8_linear_modules, set_fp8_compute  # noqa: E402

VARIANT = "hunyuanimage-v2.1-distilled"
# dense bf16 tensor-core peaks, TFLOP/s
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def random_dit(fp8: bool, device: torch.device) -> HYImageDiffusionTransformer:
    with torch.device("meta"):
        model = HYImageDiffusionTransformer(**resolve_dit_config(VARIANT).to_dict(), dtype=torch.bfloat16)
    model.to_empty(device=device)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.02, 0.02)
        if fp8:
            convert_to_fp8_linear(model, fp8_linear_modules(model))
    return model.eval().requires_grad_(False)


def step_inputs(config, device: torch.device, text_valid: int, glyph_valid: int) -> dict:
    text_mask = (torch.arange(TEXT_POSITIONS, device=device) < text_valid).long()[None]
    glyph_mask = (torch.arange(GLYPH_POSITIONS, device=device) < glyph_valid).long()[None]
    text = torch.randn(1, TEXT_POSITIONS, config.text_states_dim, device=device, dtype=torch.bfloat16)
    glyph = torch.randn(1, GLYPH_POSITIONS, BYT5_DIM, device=device, dtype=torch.bfloat16)
    text, text_mask = trim_padding(text, text_mask)
    glyph, glyph_mask = trim_padding(glyph, glyph_mask)
    times = torch.tensor([700.0], device=device)
    return dict(
        hidden_states=torch.randn(1, config.in_channels, LATENT_SIZE, LATENT_SIZE, device=device, dtype=torch.bfloat16),
        timestep=times, text_states=text, encoder_attention_mask=text_mask,
        byt5_text_states=glyph, byt5_text_mask=glyph_mask, guidance=times * 3.25, timesteps_r=times - 100,
    )


def seconds_per_step(model: torch.nn.Module, batch: dict, steps: int) -> float:
    with torch.no_grad():
        for _ in range(2):  # warm-up (and compilation)
            model(**batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model(**batch)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--text-valid", type=int, default=100)
    parser.add_argument("--glyph-valid", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: this benchmark needs a GPU; nothing measured.")
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    config = resolve_dit_config(VARIANT)
    flops = useful_flops(config, LATENT_SIZE**2, args.text_valid, args.glyph_valid)
    print(f"{name}, {VARIANT} 2048x2048, text {args.text_valid}/{TEXT_POSITIONS}, glyph {args.glyph_valid}/"
          f"{GLYPH_POSITIONS} valid (trimmed), {flops / 1e12:.1f} TFLOP per step, bf16 peak {peak} TFLOP/s")
    print(f"{'weights':<10}{'compute':<12}{'compiled':<10}{'s/step':>8}{'TFLOP/s':>9}{'MFU':>7}")
    rows = [("bf16", None), ("bf16", "split"), ("fp8", "dequant"), ("fp8", "dequant split"), ("fp8", "scaled_mm")]
    for weights, compute in rows:
        split = compute is not None and compute.endswith("split")
        for compiled in (False, True) if not (args.no_compile or split) else (False,):
            model = random_dit(weights == "fp8", device)
            if compute is not None:
                set_fp8_compute(model, compute.removesuffix(" split") if weights == "fp8" else None)
            if compiled:
                torch._dynamo.reset()
                model.compile_blocks()
            batch = step_inputs(config, device, args.text_valid, args.glyph_valid)
            with split_projections() if split else contextlib.nullcontext():
                seconds = seconds_per_step(model, batch, args.steps)
            tflops = flops / seconds / 1e12
            mfu = f"{tflops / peak:6.1%}" if peak else "     -"
            print(f"{weights:<10}{compute or '-':<12}{str(compiled):<10}{seconds:8.3f}{tflops:9.1f}{mfu:>7}")
            del model, batch
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
