"""Host RAM of `HunyuanImagePipeline.from_pretrained`: peak RSS against the sizes of the files it reads.

Each case runs in a fresh subprocess and reports its peak resident set size (ru_maxrss) minus the RSS of
the same process after its imports, next to the size of the checkpoint files it loads:
- the tiny tree: every part of the official layout at a tiny size, one full generation with the refiner;
- a synthetic multi-GB DiT (the released width, 3584, with fewer blocks) in that tree, loaded through
  the pipeline and run for one forward, in bf16 and with FP8 quantization while loading.
The official loader holds the whole checkpoint next to the model (about 2x the file); the goal here is
at most ~1.1x the file for bf16, and about half of it for FP8.

    python benchmarks/bench_pipeline_host_ram.py --gb 2.5
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3

CHILD = r"""
import json, resource, sys
import torch
torch.set_num_threads(2)
from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline
import hyimage.models.dit.model, hyimage.text_encoders.mllm, hyimage.text_encoders.glyph, hyimage.models.vae.vae_2d
import hyimage.models.vae.vae_3d, hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline
case, root = sys.argv[1], sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if case == "tree":
    pipe = HunyuanImagePipeline.from_pretrained(model_root=root, use_fp8=True)
    pipe(prompt='a sign that reads "RAM"', width=128, height=96, num_inference_steps=2, seed=0, use_refiner=True)
else:
    # bf16 as on a GPU (on CPU the loader's default is float32, twice the file)
    pipe = HunyuanImagePipeline.from_pretrained(model_root=root, use_fp8=case == "dit_fp8", dtype=torch.bfloat16)
    dit = pipe.dit
    with pipe.memory.running(dit), torch.no_grad():
        dtype = next(p.dtype for p in dit.parameters() if p.dtype.itemsize > 1)
        dit(torch.randn(1, 64, 2, 2, dtype=dtype), torch.tensor([500.0]), torch.randn(1, 8, 32, dtype=dtype),
            torch.ones(1, 8, dtype=torch.long), byt5_text_states=torch.zeros(1, 4, 1472, dtype=dtype),
            byt5_text_mask=torch.zeros(1, 4, dtype=torch.long))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak}))
"""

WRITER = r"""
import json, sys
import torch
from safetensors.torch import save_file
from hyimage.models.dit.configs import resolve_dit_config
from hyimage.models.dit.model import HYImageDiffusionTransformer
path, singles = sys.argv[1], int(sys.argv[2])
config = resolve_dit_config("hunyuanimage-v2.1").to_dict()
config.update(mm_double_blocks_depth=1, mm_single_blocks_depth=singles, text_states_dim=32)
with torch.device("meta"):
    model = HYImageDiffusionTransformer(**config, dtype=torch.bfloat16)
generator = torch.Generator().manual_seed(0)
state = {k: torch.empty(v.shape, dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=generator)
         for k, v in model.state_dict().items()}
save_file(state, path)
open(path.replace(".safetensors", ".json"), "w").write(json.dumps(config))
"""


def run(code: str, *args: str) -> str:
    env = {"PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                            env={**os.environ, **env})
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.5, help="approximate size of the synthetic DiT file")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the trees (default: a temp dir)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.fixtures.qwen_tokenizer import write_qwen_tokenizer
    from tests.fixtures.tiny_tree import write_tiny_tree

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        root = write_tiny_tree(tmp / "ckpts", write_qwen_tokenizer(tmp / "tokenizer"))
        rows = []
        measured = json.loads(run(CHILD, "tree", str(root)))
        rows.append(("tiny tree, full run (FP8, refiner)", tree_size(root), measured))

        # released width: ~0.88 GB outside the blocks, 0.93 GB per double block, 0.39 GB per single block
        singles = max(1, round((args.gb - 0.88 - 0.93) / 0.385))
        dit = root / "dit" / "hunyuanimage2.1.safetensors"
        for name in ("hunyuanimage2.1_fp8.safetensors", "hunyuanimage2.1_fp8_scale.safetensors"):
            (root / "dit" / name).unlink()
        run(WRITER, str(dit), str(singles))
        size = dit.stat().st_size
        for case, label in (("dit_bf16", "synthetic DiT, bf16"), ("dit_fp8", "synthetic DiT, FP8 on load")):
            rows.append((label, size, json.loads(run(CHILD, case, str(root)))))

    print(f"{'case':<36} {'files GiB':>10} {'peak RSS - imports GiB':>23} {'ratio':>6}")
    for label, size, m in rows:
        grown = m["peak"] - m["base"]
        print(f"{label:<36} {size / GIB:10.3f} {grown / GIB:23.3f} {grown / size:6.2f}")


if __name__ == "__main__":
    main()
