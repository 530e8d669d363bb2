"""Peak host memory and time to decode 512x512 images on the CPU with the full-size 32x VAE (random weights).

Four ways, each in a fresh subprocess on the same latents (batch of 2: a smooth latent and a random one):
  whole    one decoder call for the batch
  sliced   vae.enable_slicing(): one image at a time (same numbers)
  tiled    vae.enable_tiling(tile, overlap): overlapping latent tiles blended linearly (numbers change)
  exact    vae.enable_exact_tiling(exact_tile): layer by layer over tiles of exact_tile pixels (same numbers up
           to float summation order)
Peak memory is the decode's own: each worker resets its peak RSS (/proc/self/clear_refs) after building the
model and reads VmHWM after decoding. The error is max|mode - whole| / max|whole| per image.

    python benchmarks/bench_vae_decode.py [--size 512] [--tile 12] [--overlap 3] [--exact-tile 128] [--threads 2]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

MODES = ("whole", "sliced", "tiled", "exact")
FULL_SIZE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 64,
    "block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "layers_per_block": 2,
    "ffactor_spatial": 32,
    "sample_size": 384,
    "sample_tsize": 1,
    "scaling_factor": 0.75289,
}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def latents_for(size: int):
    """A smooth latent (bilinear upsampling of 4x4 noise) and a white-noise latent, both unit scale."""
    import torch
    from torch.nn import functional as F

    side = size // 32
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 64, 4, 4, generator=generator)
    smooth = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=True)
    noise = torch.randn(1, 64, side, side, generator=generator)
    return torch.cat([smooth / smooth.std(), noise])


def worker(mode: str, size: int, tile: int, overlap: int, exact_tile: int, threads: int, out: Path) -> None:
    import torch

    from hyimage.models import HunyuanVAE2D

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = HunyuanVAE2D(**FULL_SIZE_CONFIG).eval()
    latents = latents_for(size)
    if mode == "sliced":
        vae.enable_slicing()
    elif mode == "tiled":
        vae.enable_tiling(tile_latent_size=tile, tile_latent_overlap=overlap)
    elif mode == "exact":
        vae.enable_exact_tiling(exact_tile)
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _rss_kib("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        images = vae.decode(latents).sample
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    torch.save(images, out)
    print(json.dumps({"seconds": seconds, "peak_extra_mib": (peak - baseline) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 32)")
    parser.add_argument(
        "--tile", type=int, default=12, help="tile side in latent pixels (default: the model default, 384 px)"
    )
    parser.add_argument(
        "--overlap", type=int, default=3, help="tile overlap in latent pixels (default: the model default)"
    )
    parser.add_argument("--exact-tile", type=int, default=128, help="exact tiling's tile side in pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.size, args.tile, args.overlap, args.exact_tile, args.threads, args.out)
        return

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in MODES:
            out = Path(folder) / f"{mode}.pt"
            command = [sys.executable, __file__, "--worker", mode, "--out", str(out)]
            command += ["--size", str(args.size), "--tile", str(args.tile), "--overlap", str(args.overlap)]
            command += ["--exact-tile", str(args.exact_tile)]
            command += ["--threads", str(args.threads)]
            completed = subprocess.run(command, check=True, capture_output=True, text=True)
            results[mode] = json.loads(completed.stdout.strip().splitlines()[-1])
            results[mode]["out"] = out
        import torch

        whole = torch.load(results["whole"]["out"], weights_only=True)
        errors = {}
        for mode in MODES[1:]:
            other = torch.load(results[mode]["out"], weights_only=True)
            errors[mode] = [
                ((other[i].double() - whole[i].double()).abs().max() / whole[i].double().abs().max()).item()
                for i in range(len(whole))
            ]

    print(f"HunyuanVAE2D full size (32x, 64 latent channels), random weights, float32, CPU, {args.threads} threads")
    print(
        f"decode 2 images of {args.size}x{args.size} (latent {args.size // 32}x{args.size // 32}); tiles "
        f"{args.tile}x{args.tile} latent px, overlap {args.overlap}; exact tiles {args.exact_tile}x{args.exact_tile} px"
    )
    whole_result = results["whole"]
    print(
        f"{'mode':8} {'time s':>8} {'x whole':>8} {'peak MiB':>9} {'x whole':>8}  max error vs whole (smooth, random)"
    )
    for mode, result in results.items():
        error = "-" if mode == "whole" else ", ".join(f"{e:.2e}" for e in errors[mode])
        print(
            f"{mode:8} {result['seconds']:8.1f} {result['seconds'] / whole_result['seconds']:8.2f} "
            f"{result['peak_extra_mib']:9.0f} {result['peak_extra_mib'] / whole_result['peak_extra_mib']:8.2f}  {error}"
        )


if __name__ == "__main__":
    main()
