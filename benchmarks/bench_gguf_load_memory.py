"""Peak host memory while loading a GGUF DiT, as a multiple of the file size.

Writes a synthetic GGUF DiT of about --gb GB in the released fused layout (block linears Q8_0 or Q4_K
random blocks, everything else F32, as city96's convert tool keeps small tensors), then loads it in fresh
subprocesses, each measuring its own peak RSS:
  hyimage      load_dit: header via `gguf`, each tensor's bytes read into fresh memory, linears kept quantised
  mmap copy    ComfyUI-GGUF's way of reading: GGUFReader's memory map, a torch tensor per tensor (copied
               here, as a model must own its weights), every page of the file touched through the map
The parent imports no torch (see bench_dit_load_memory.py for why).

    python benchmarks/bench_gguf_load_memory.py --gb 2 --type Q4_K
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.scaled_dit import HIDDEN, scaled_dit_config  # noqa: E402

BYTES_PER_PARAM = {"Q8_0": 34 / 32, "Q4_K": 144 / 256}


def write_gguf(path: Path, config: dict, qtype: str) -> None:
    """The model's tensors in the fused layout, block linears as random `qtype` blocks, written tensor by tensor."""
    import gguf
    import numpy as np
    import torch

    from hyimage.models import HYImageDiffusionTransformer

    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    model = HYImageDiffusionTransformer.from_config(config, device="meta")
    state = model.state_dict()
    shapes: dict[str, tuple] = {}
    for key, tensor in state.items():
        if key.startswith("double_blocks.") and "_attn_q." in key:
            shapes[key.replace("_attn_q.", "_attn_qkv.")] = (3 * tensor.shape[0], *tensor.shape[1:])
        elif ".linear1_q." in key:
            mlp = state[key.replace("linear1_q", "linear1_mlp")]
            shapes[key.replace("linear1_q", "linear1")] = (3 * tensor.shape[0] + mlp.shape[0], *tensor.shape[1:])
        elif (
            not (key.startswith("double_blocks.") and ("_attn_k." in key or "_attn_v." in key))
            and ".linear1_" not in key
        ):
            shapes[key.replace("linear2.fc.", "linear2.")] = tuple(tensor.shape)
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "hyvid")
    quantised = {}
    for key, shape in shapes.items():
        if "blocks." in key and key.endswith(".weight") and len(shape) == 2 and shape[1] % block == 0:
            quantised[key] = kind
            writer.add_tensor_info(
                key,
                (shape[0], shape[1] // block * size),
                np.dtype(np.uint8),
                shape[0] * shape[1] // block * size,
                raw_dtype=kind,
            )
        else:
            writer.add_tensor_info(key, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key, shape in shapes.items():
        if key in quantised:
            raw = rng.integers(0, 256, size=(shape[0] * shape[1] // block, size), dtype=np.uint8)
            raw[:, :2] = np.array([0.001], dtype=np.float16).view(
                np.uint8
            )  # a finite scale (d is first in Q8_0 and Q4_K)
            writer.write_tensor_data(raw.reshape(shape[0], -1))
        else:
            writer.write_tensor_data((torch.randn(shape) * 0.02).numpy())
    writer.close()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(method: str, path: str, config: dict, qtype: str) -> None:
    import torch

    torch.set_num_threads(2)
    before = peak_rss()
    start = time.perf_counter()
    if method == "write":
        write_gguf(Path(path), config, qtype)
        return
    if method == "hyimage":
        from hyimage.models import HYImageDiffusionTransformer

        model = HYImageDiffusionTransformer.from_single_file(path, config)
        held = sum(t.untyped_storage().nbytes() for t in model.state_dict().values())
    else:
        import gguf

        reader = gguf.GGUFReader(path)
        tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
        held = sum(t.untyped_storage().nbytes() for t in tensors.values())
    seconds = time.perf_counter() - start
    print(json.dumps({"peak": peak_rss(), "before": before, "seconds": seconds, "held": held}))


def run_child(method: str, path: Path, args: argparse.Namespace) -> str:
    command = [sys.executable, __file__, "--gb", str(args.gb), "--type", args.type, "--child", method, str(path)]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, LOGURU_LEVEL="WARNING"))
    if result.returncode:
        sys.exit(f"{method} failed:\n{result.stderr}")
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="file size in GB (default 2)")
    parser.add_argument("--type", choices=sorted(BYTES_PER_PARAM), default="Q4_K")
    parser.add_argument("--dir", type=Path, default=None, help="where to write it (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = scaled_dit_config(args.gb, BYTES_PER_PARAM[args.type])
    if args.child:
        child(args.child[0], args.child[1], config, args.type)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "synthetic_dit.gguf"
        run_child("write", path, args)
        size = path.stat().st_size
        with open(path, "rb", buffering=0) as file:  # warm the page cache (RSS does not count it)
            while file.read(16 * 2**20):
                pass
        blocks = config["mm_double_blocks_depth"]
        print(f"GGUF {args.type}: {size / 1e9:.2f} GB, {blocks} double + {blocks} single blocks of width {HIDDEN}")
        print(
            f"{'method':<10} {'peak RSS GB':>11} {'peak/file':>9} {'(peak-start)/file':>17} {'held/file':>9} {'s':>5}"
        )
        for method in ("hyimage", "mmap copy"):
            r = json.loads(run_child(method, path, args).splitlines()[-1])
            print(
                f"{method:<10} {r['peak'] / 1e9:>11.2f} {r['peak'] / size:>9.3f} "
                f"{(r['peak'] - r['before']) / size:>17.3f} {r['held'] / size:>9.3f} {r['seconds']:>5.1f}"
            )


if __name__ == "__main__":
    main()
