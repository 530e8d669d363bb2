"""One single block's linear1 (q|k|v|mlp) on the CPU, three ways: four GEMMs (the parts one by one), one GEMM over
the packed weights (models/dit/fused.py: the parts are row views of one tensor), and `torch.cat` of the weights
per call followed by one GEMM (the alternative to packing that costs no memory).

    python benchmarks/bench_fused_projection_cpu.py [--threads 2] [--repeats 5] [--hidden 512,1024] [--tokens 1134]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from hyimage.models.dit.fused import pack, project  # noqa: E402


def median_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", default="512,1024")
    parser.add_argument("--tokens", type=int, default=1134, help="1024 image + 110 text tokens, as bench_step_cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"linear1 of one single block, {args.tokens} tokens, {args.threads} threads, median of {args.repeats}")
    print(f"{'dtype':<10}{'hidden':>7}{'4 GEMMs s':>11}{'packed':>9}{'cat+GEMM':>10}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for hidden in map(int, args.hidden.split(",")):
            parts = [nn.Linear(hidden, n, dtype=dtype) for n in (hidden, hidden, hidden, 4 * hidden)]
            x = torch.randn(1, args.tokens, hidden, dtype=dtype)
            with torch.inference_mode():
                split = median_seconds(lambda: [part(x) for part in parts], args.repeats)
                pack(parts)
                packed = median_seconds(lambda: project(x, parts), args.repeats)
                cat = median_seconds(
                    lambda: F.linear(x, torch.cat([p.weight for p in parts]), torch.cat([p.bias for p in parts])),
                    args.repeats,
                )
            print(f"{dtype_name:<10}{hidden:>7}{split:>11.4f}{packed / split:>8.2f}x{cat / split:>9.2f}x")


if __name__ == "__main__":
    main()
