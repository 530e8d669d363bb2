"""What `verify=True` costs while loading a DiT: wall time and peak host memory, against a plain load.

Writes a synthetic bf16 checkpoint of about --gb GB (the released block widths, fewer blocks), then loads it in
fresh subprocesses, alternating plain and verifying loads --repeat times each; every child reports its load time
and its own peak RSS (resource.getrusage). Prints the medians and the ratios verify / plain.

    python benchmarks/bench_verify_load.py --gb 1

On a busy machine use --threads 1: each parallel reduction otherwise waits for a descheduled worker thread
(about 30 ms per tensor at a load average of 15 on 2 cores), which measures the machine, not the scan.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.scaled_dit import scaled_dit_config  # noqa: E402

WRITE = """
import json, sys, torch
from safetensors.torch import save_file
from hyimage.models import HYImageDiffusionTransformer
config = json.loads(sys.argv[1])
with torch.device("meta"):
    model = HYImageDiffusionTransformer(**config)
state = {k: torch.randn(v.shape).to(torch.bfloat16) for k, v in model.state_dict().items()}
save_file(state, sys.argv[2])
"""

LOAD = """
import json, resource, sys, time, torch
from hyimage.models import HYImageDiffusionTransformer
config, path, verify, threads = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
if threads:
    torch.set_num_threads(threads)
start = time.perf_counter()
HYImageDiffusionTransformer.from_single_file(path, config, verify=verify, progress_bar=False)
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": peak_mb}))
"""


def run(code: str, *args: str) -> str:
    env = {"PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the loaders (0: torch's default)")
    args = parser.parse_args()
    config = json.dumps(scaled_dit_config(args.gb))
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "dit.safetensors")
        run(WRITE, config, path)
        size_gb = Path(path).stat().st_size / 1e9
        results: dict[str, list[dict]] = {"plain": [], "verify": []}
        for _ in range(args.repeat):
            for name, flag in (("plain", "0"), ("verify", "1")):
                results[name].append(json.loads(run(LOAD, config, path, flag, str(args.threads))))
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in ("seconds", "peak_mb")}
        for name, runs in results.items()
    }
    print(f"file: {size_gb:.2f} GB, {args.repeat} loads each")
    for name, values in medians.items():
        print(f"{name:7s} load {values['seconds']:.2f} s, peak RSS {values['peak_mb']:.0f} MB")
    ratio = {key: medians["verify"][key] / medians["plain"][key] for key in ("seconds", "peak_mb")}
    print(f"verify / plain: time {ratio['seconds']:.2f}x, peak RSS {ratio['peak_mb']:.3f}x")


if __name__ == "__main__":
    main()
