"""Predicted speed-up of `--parallel cfg=C,sp=S` from an analytic model of compute and communication per step.

Nothing runs on a GPU: the model counts the DiT's FLOPs and the bytes `hyimage.parallel` moves, per rank.

Compute per forward (one sample, bf16): every block is 24 d^2 FLOPs per token in its linear layers (double
stream: q, k, v, proj and a 4x MLP per stream; single stream: q, k, v, MLP in and the fused output layer) and
4 N^2 d FLOPs in attention, over 20 double + 40 single blocks. With sequence parallelism over S ranks a rank
computes its share of the image and of the text tokens, and ceil(H/S)/H of the attention (the slowest rank has
the most heads).
Communication per attention and rank: q, k, v out and the output back through all-to-alls, each sending
(S-1)/S of the rank's activations (N/S x d x 2 bytes); 8 collectives (image and text apart), each with a fixed
latency. CFG-parallel
(C=2) runs the conditional and unconditional branches on different ranks, exchanging one prediction per step
(N_img x 64 x 2 bytes, negligible). Nothing overlaps: step time = compute / throughput + bytes / bandwidth +
collectives x latency.

    python benchmarks/parallel_speedup_model.py [--tflops 400] [--nvlink-gbs 350] [--pcie-gbs 20]
"""

import argparse
import math

BLOCKS = 60  # 20 double-stream + 40 single-stream, base and refiner alike
MODELS = {
    # name: (hidden size, heads, image tokens at 2048x2048, text tokens as the loop feeds them, has CFG)
    "base 2K (4096 image + 1128 text tokens)": (3584, 28, (2048 // 32) ** 2, 1000 + 128, True),
    "refiner 2K (16384 image + 256 text tokens)": (3328, 26, (2048 // 16) ** 2, 256, False),
}
LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(2, 2), (1, 4)], 8: [(2, 4), (1, 8)]}


def forward_seconds(
    d: int, heads: int, n_img: int, text: int, sp: int, tflops: float, gbs: float, latency: float
) -> float:
    """One DiT forward of one sample on each of `sp` ranks."""
    n = n_img + text
    head_share = math.ceil(heads / sp) / heads
    flops = BLOCKS * (24 * d * d * (math.ceil(n_img / sp) + math.ceil(text / sp)) + 4 * n * n * d * head_share)
    seconds = flops / (tflops * 1e12)
    if sp > 1:
        sent = 4 * (n / sp) * d * 2 * (sp - 1) / sp
        seconds += BLOCKS * (sent / (gbs * 1e9) + 8 * latency)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflops", type=float, default=400.0,
                        help="sustained bf16 TFLOP/s per GPU (H100: ~40%% of 989)")
    parser.add_argument("--nvlink-gbs", type=float, default=350.0, help="all-to-all GB/s per GPU over NVLink 4")
    parser.add_argument("--pcie-gbs", type=float, default=20.0, help="all-to-all GB/s per GPU over PCIe 4.0 x16")
    parser.add_argument("--nvlink-latency-us", type=float, default=15.0)
    parser.add_argument("--pcie-latency-us", type=float, default=40.0)
    args = parser.parse_args()
    links = {
        "NVLink": (args.nvlink_gbs, args.nvlink_latency_us * 1e-6),
        "PCIe": (args.pcie_gbs, args.pcie_latency_us * 1e-6),
    }

    for name, (d, heads, n_img, text, has_cfg) in MODELS.items():
        branches = 2 if has_cfg else 1
        one = branches * forward_seconds(d, heads, n_img, text, 1, args.tflops, 1.0, 0.0)
        print(f"\n{name}: {one * 1000:.0f} ms per step on 1 GPU ({branches} forward{'s' * (branches > 1)})")
        print(f"{'GPUs':>4}  {'layout':<12}{'NVLink step':>12}{'speed-up':>10}{'PCIe step':>12}{'speed-up':>10}")
        for gpus, layouts in LAYOUTS.items():
            for cfg, sp in layouts if has_cfg else [(1, gpus)]:
                row = f"{gpus:>4}  {f'cfg={cfg},sp={sp}':<12}"
                for gbs, latency in links.values():
                    step = (branches // cfg) * forward_seconds(d, heads, n_img, text, sp, args.tflops, gbs, latency)
                    row += f"{step * 1000:>10.0f}ms{one / step:>9.2f}x"
                print(row)


if __name__ == "__main__":
    main()
