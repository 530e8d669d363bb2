"""Peak host memory while loading a DiT checkpoint, as a multiple of the file size.

Writes a synthetic bf16 checkpoint of about --gb GB (a DiT of the released architecture, fewer blocks), in the
split layout and in the released fused layout, then loads them in fresh subprocesses, each measuring its own
peak RSS (resource.getrusage):
  hyimage            load_dit (meta build, tensors read one at a time from the file)
  hyimage fused      load_dit of the fused file (each split tensor read from its rows of the fused one)
  hyimage fp8        load_dit(quantize_fp8=True) (quantized per tensor while loading)
  load_file          the official way: model allocated on the CPU, safetensors.torch.load_file, load_state_dict
The parent imports no torch and writes the file from a subprocess too: on Linux a child's ru_maxrss starts
at its parent's RSS at fork time, so a lean parent keeps each child's figure its own.

    python benchmarks/bench_dit_load_memory.py --gb 3
"""

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.scaled_dit import HIDDEN, scaled_dit_config  # noqa: E402


def write_checkpoint(path: Path, config: dict, fused: bool) -> None:
    """A safetensors file of random bf16 tensors (split or fused layout), written one tensor at a time."""
    import torch

    from hyimage.models import HYImageDiffusionTransformer
    from tests.fixtures.dit_layouts import fused_layout

    state = HYImageDiffusionTransformer.from_config(config, device="meta").state_dict()
    shapes = {key: tuple(tensor.shape) for key, tensor in (fused_layout(state) if fused else state).items()}
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for shape in shapes.values():
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            file.write(tensor.view(torch.uint8).numpy().tobytes())


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(method: str, path: str, config: dict) -> None:
    """Load once with `method` and print peak RSS figures as JSON."""
    sys.path.insert(0, str(REPO))
    import torch
    from safetensors.torch import load_file

    from hyimage.models import HYImageDiffusionTransformer

    torch.set_num_threads(2)
    before = peak_rss()
    start = time.perf_counter()
    if method.startswith("write"):
        write_checkpoint(Path(path), config, fused=method == "write fused")
        return
    if method in ("hyimage", "hyimage fused"):
        model = HYImageDiffusionTransformer.from_single_file(path, config)
    elif method == "hyimage fp8":
        model = HYImageDiffusionTransformer.from_single_file(path, config, quantize_fp8=True)
    else:
        model = HYImageDiffusionTransformer.from_config(config, dtype=torch.bfloat16, device="meta")
        model = model.to_empty(device="cpu")
        model.load_state_dict(load_file(path), strict=True)
    seconds = time.perf_counter() - start
    storages = {id(t.untyped_storage()): t.untyped_storage() for t in model.state_dict().values()}  # packed q|k|v
    held = sum(storage.nbytes() for storage in storages.values())  # rows share one storage: count it once
    print(json.dumps({"peak": peak_rss(), "before": before, "seconds": seconds, "held": held}))


def warm_page_cache(path: Path) -> None:
    """Read the file once so that every method finds it in the page cache (which RSS does not count)."""
    buffer = bytearray(16 * 2**20)
    with open(path, "rb", buffering=0) as file:
        while file.readinto(buffer):
            pass


def run_child(method: str, path: Path, gigabytes: float) -> str:
    command = [sys.executable, __file__, "--gb", str(gigabytes), "--child", method, str(path)]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, LOGURU_LEVEL="WARNING"))
    if result.returncode:
        sys.exit(f"{method} failed:\n{result.stderr}")
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=3.0, help="checkpoint size in GB (default 3)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write it (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = scaled_dit_config(args.gb, glyph=True)
    if args.child:
        child(args.child[0], args.child[1], config)
        return

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "synthetic_dit.safetensors"
        fused_path = Path(folder) / "synthetic_dit_fused.safetensors"
        start = time.perf_counter()
        run_child("write", path, args.gb)
        run_child("write fused", fused_path, args.gb)
        size = path.stat().st_size
        assert abs(fused_path.stat().st_size - size) < 2**20
        warm_page_cache(path)
        warm_page_cache(fused_path)
        blocks = config["mm_double_blocks_depth"]
        print(
            f"checkpoint: {size / 1e9:.2f} GB, {blocks} double + {blocks} single blocks of width {HIDDEN}, "
            f"written in {time.perf_counter() - start:.0f} s"
        )
        print(
            f"{'method':<14} {'peak RSS GB':>11} {'peak/file':>9} {'(peak-start)/file':>17} {'held/file':>9} {'s':>5}"
        )
        for method in ("hyimage", "hyimage fused", "hyimage fp8", "load_file"):
            r = json.loads(run_child(method, fused_path if "fused" in method else path, args.gb).splitlines()[-1])
            print(
                f"{method:<14} {r['peak'] / 1e9:>11.2f} {r['peak'] / size:>9.3f} "
                f"{(r['peak'] - r['before']) / size:>17.3f} {r['held'] / size:>9.3f} {r['seconds']:>5.1f}"
            )


if __name__ == "__main__":
    main()
