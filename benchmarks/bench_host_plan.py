"""Host RAM per stage: the memory plan's prediction against the peak RSS measured, with a host budget that forces
releases, and the full-size plan for a 32 GiB host.

Measured: a scaled tree (the tiny tree with a distilled DiT and a refiner DiT at the released widths with few
blocks, FP8 quantized while loading, and a Qwen2.5-VL text encoder 1024 wide) runs a whole call with the refiner
on the CPU twice in a fresh process; a thread samples the RSS every 2 ms and keeps the peak of each stage (the
stage is the one whose part is being built or run). The second call is the steady state the plan describes.
Predicted: the plan's host figure of each stage (`hyimage.offload.planner.plan_host`, the part sizes counted by
`hyimage.diffusion.pipelines.part_sizes`) minus its process base; measured: peak RSS minus the RSS after imports. The CPU
run holds its activations in host memory too (small at 64x64), which the plan (made for GPUs) does not count.

With `--budget-gib auto` (the default, as `from_pretrained`) the budget is what the machine can give
(`hyimage.offload.machine`); a number forces releases on the scaled tree (2.0 releases the text encoder and DiTs).
Both are run unless one is given.

    python benchmarks/bench_host_plan.py [--budget-gib auto|2.0] [--singles 2]
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
import json, sys, threading, time
import torch
torch.set_num_threads(2)
from hyimage import HunyuanImagePipeline
from hyimage.offload.host_plan import HOST_BASE_CPU_GIB
from hyimage.offload.manager import stage_of
from hyimage.offload.weights import GIB
import hyimage.models, hyimage.text_encoders.mllm, hyimage.text_encoders.glyph
import hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

root, budget = sys.argv[1], sys.argv[2] if sys.argv[2] == "auto" else float(sys.argv[2])
base = rss()
pipe = HunyuanImagePipeline.from_pretrained(model_root=root, model_name="hunyuanimage-v2.1-distilled", use_fp8=True,
                                            reprompt_model=None, progress_bar=False, host_budget_gb=budget)
memory = pipe.memory
current, peaks, done = ["setup"], {}, []

def sample():
    while not done:
        peaks[current[0]] = max(peaks.get(current[0], 0), rss())
        time.sleep(0.002)

keeper_build = memory.host.before_build
def before_build(stage):
    keeper_build(stage)  # what it releases is still the previous stage's
    current[0] = stage or current[0]
memory.host.before_build = before_build
running = memory.running
def placed(module):
    current[0] = stage_of(module) or current[0]
    return running(module)
memory.running = placed
thread = threading.Thread(target=sample, daemon=True)
thread.start()
call = dict(prompt='a sign that reads "RAM"', width=64, height=64, num_inference_steps=2, seed=0, use_refiner=True)
pipe(**call)
peaks.clear()
pipe(**call)
done.append(1)
thread.join()
plan = memory.host_plan()
print(json.dumps({"base": base, "peaks": peaks, "budget": memory.host_budget_gib(),
                  "sizes": memory.part_sizes(memory.device),
                  "predicted": {s: step.peak for s, step in plan.items() if not step.refused},
                  "released": {s: step.released for s, step in plan.items()},
                  "plan_base": HOST_BASE_CPU_GIB * GIB}))
"""

WRITER = r"""
import json, sys
import torch
from safetensors.torch import save_file
from hyimage.models.dit.configs import resolve_dit_config
from hyimage.models.dit.model import HYImageDiffusionTransformer
from tests.fixtures.dit_layouts import fused_layout
path, variant, singles, text_dim, fp8 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
config = resolve_dit_config(variant).to_dict()
config.update(mm_double_blocks_depth=1, mm_single_blocks_depth=singles, text_states_dim=text_dim)
with torch.device("meta"):
    model = HYImageDiffusionTransformer(**config, dtype=torch.bfloat16)
generator = torch.Generator().manual_seed(0)
state = {k: torch.empty(v.shape, dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=generator)
         for k, v in model.state_dict().items()}
open(path.replace(".safetensors", ".json"), "w").write(json.dumps(config))
if not fp8:
    save_file(state, path)
    sys.exit()
from hyimage.quantization.fp8 import convert_to_fp8_linear, fp8_linear_modules
model = HYImageDiffusionTransformer(**config, dtype=torch.bfloat16)
model.load_state_dict(state)
del state
names = fp8_linear_modules(model)
convert_to_fp8_linear(model, names)
state = {k: v.contiguous() for k, v in model.state_dict().items()}
save_file(state, path.replace(".safetensors", "_fp8.safetensors"))
save_file({n: state[n + ".weight_scale"] for n in names}, path.replace(".safetensors", "_fp8_scale.safetensors"))
"""


def run(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def full_size_tables() -> None:
    from hyimage.offload.planner import make_plan
    from hyimage.offload.request import PlanRequest
    from hyimage.offload.ways_out import ways_out

    for reprompt in (None, "7b", "32b"):
        for gpu in (24, 12):
            print(make_plan(PlanRequest(fp8=True, refiner=True, reprompt=reprompt), gpu, 32), end="\n\n")
    first = PlanRequest(variant="hunyuanimage-v2.1-distilled", fp8=True, refiner=True)
    print("the README's first command (distilled, FP8, refiner, 2048x2048): planned host peak per stage, GiB")
    for gpu in (8, 12, 24):
        for host in (16, 24, 32, 64):
            plan = make_plan(first, gpu, host)
            peaks = " ".join(f"{s.stage} {s.host_gib:.1f}{'' if s.placement != 'refused' else ' refused'}"
                             for s in plan.stages)
            fix = "" if plan.fits else "; fits with: " + " or ".join(w.describe("generate") for w in ways_out(plan))
            print(f"GPU {gpu} GiB, host {host} GiB: {peaks}{fix}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", action="append", default=None,
                        help="the host budget of a measured run: auto or GiB; repeatable (default: auto and 2.0)")
    parser.add_argument("--singles", type=int, default=2, help="single-stream blocks of the scaled DiTs")
    parser.add_argument("--fp8-files", action="store_true",
                        help="write the scaled DiTs as FP8 pairs, as released (default: bf16, quantized while loading)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the tree (default: a temp dir)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from hyimage.checkpoints.layout import CheckpointLayout
    from tests.fixtures.qwen_tokenizer import write_qwen_tokenizer
    from tests.fixtures.tiny_qwen import write_tiny_qwen25vl
    from tests.fixtures.tiny_tree import write_tiny_tree

    full_size_tables()
    text_dim = 1024
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        tokenizer = write_qwen_tokenizer(tmp / "tokenizer")
        root = write_tiny_tree(tmp / "ckpts", tokenizer)
        layout = CheckpointLayout(root)
        write_tiny_qwen25vl(layout.text_encoder, tokenizer, num_hidden_layers=6, hidden_size=text_dim)
        for variant in ("hunyuanimage-v2.1-distilled", "hunyuanimage-refiner"):
            layout.dit(variant).unlink()
            for path in (layout.dit_fp8(variant), layout.dit_fp8_scale(variant)):
                path.unlink(missing_ok=True)
            run(WRITER, str(layout.dit(variant)), variant, str(args.singles), str(text_dim), str(int(args.fp8_files)))
        for budget in args.budget_gib or ["auto", "2.0"]:
            report(json.loads(run(CHILD, str(root), budget)), budget, args.fp8_files)


def report(m: dict, budget: str, fp8_files: bool) -> None:
    files = "FP8 pairs" if fp8_files else "bf16, quantized to FP8 while loading"
    planned = "no limit" if m["budget"] is None else f"{m['budget']:.1f} GiB"
    print(f"\nscaled tree on the CPU (DiTs: {files}), host budget {budget} ({planned}); part sizes once loaded "
          "(while loading), GiB: " + ", ".join(f"{k} {a / GIB:.3f} ({b / GIB:.3f})" for k, (a, b) in m["sizes"].items()))
    print(f"process after imports: {m['base'] / GIB:.3f} GiB of RSS (the plan counts {m['plan_base'] / GIB:g})")
    print(f"{'stage':<14}{'predicted GiB':>14}{'measured GiB':>14}{'ratio':>7}  released before it")
    for stage, predicted in m["predicted"].items():
        if stage not in m["peaks"]:
            continue
        p, g = (predicted - m["plan_base"]) / GIB, (m["peaks"][stage] - m["base"]) / GIB
        print(f"{stage:<14}{p:14.3f}{g:14.3f}{g / p:7.2f}  {', '.join(m['released'][stage]) or '-'}")


if __name__ == "__main__":
    main()
