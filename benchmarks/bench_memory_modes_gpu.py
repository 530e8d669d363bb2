"""Peak GPU memory and seconds per denoising step of the full-size DiT at 2K in each memory mode, FP8 off and on.

The DiT is the released base architecture (17B parameters) with random weights; one step is one forward of
a CFG batch of 2 at 2048x2048 (64x64 latent tokens, 1000 text tokens, 128 glyph tokens), as the base model
runs. Modes: "none" (the whole DiT on the GPU), "model" (moved to the GPU for the loop; the move is timed
apart), "block" (double/single blocks streamed from pinned host memory, at several weight budgets).

    python benchmarks/bench_memory_modes_gpu.py [--steps 3] [--budgets 0,8,16] [--variant hunyuanimage-v2.1]
    python benchmarks/bench_memory_modes_gpu.py --plan 24,16,12,8 [--variant hunyuanimage-v2.1-distilled]

`--plan` measures the DiT stage as the memory planner places it for each GPU budget (run as the pipeline runs
it: bf16 autocast, batch 2 for the base model's CFG, 1 for the distilled) and prints the planned peak next to
`torch.cuda.max_memory_allocated`; the planner keeps its margin free on top of the planned peak.

Needs CUDA, about 40 GB of host RAM (bf16 weights) and, for mode "none" in bf16, an 80 GB GPU; rows that
do not fit report "out of memory". Without CUDA it says so and exits 0.
"""

import argparse
import functools
import gc
import time

import torch

from hyimage.models.dit.configs import resolve_dit_config
from hyimage.models.dit.model import HYImageDiffusionTransformer
from hyimage.offload import MemoryManager
from hyimage.quantization.fp8 import convert_to_fp8_linear, fp8_linear_modules

GIB = 1024**3


def random_dit(variant: str, fp8: bool) -> HYImageDiffusionTransformer:
    """The full-size DiT in host memory, bf16 random weights (FP8 linears quantized from them when `fp8`)."""
    config = resolve_dit_config(variant).to_dict()
    with torch.device("meta"):
        model = HYImageDiffusionTransformer(**config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.02, 0.02, generator=generator)
        for buffer in model.buffers():
            buffer.zero_()
        if fp8:
            convert_to_fp8_linear(model, fp8_linear_modules(model))
    return model.eval().requires_grad_(False)


def inputs(model: HYImageDiffusionTransformer, device: torch.device) -> dict:
    config = model.config
    batch, text_len, glyph_len = 2, 1000, 128
    text_mask = torch.zeros(batch, text_len, dtype=torch.long, device=device)
    text_mask[:, :120] = 1
    glyph_mask = torch.zeros(batch, glyph_len, dtype=torch.long, device=device)
    glyph_mask[1, :20] = 1
    return dict(
        hidden_states=torch.randn(batch, config.in_channels, 64, 64, device=device, dtype=torch.bfloat16),
        timestep=torch.full((batch,), 900.0, device=device),
        text_states=torch.randn(batch, text_len, config.text_states_dim, device=device, dtype=torch.bfloat16),
        encoder_attention_mask=text_mask,
        byt5_text_states=torch.randn(batch, glyph_len, 1472, device=device, dtype=torch.bfloat16),
        byt5_text_mask=glyph_mask,
    )


def measure(model: HYImageDiffusionTransformer, memory: MemoryManager, steps: int) -> tuple[float, float, float]:
    """(seconds to enter the running context, seconds per step, peak GiB) for `steps` forwards after a warm-up."""
    device = memory.device
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    batch = inputs(model, device)
    start = time.perf_counter()
    with memory.running(model), torch.no_grad():
        torch.cuda.synchronize()
        entered = time.perf_counter() - start
        model(**batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model(**batch)
        torch.cuda.synchronize()
        per_step = (time.perf_counter() - start) / steps
    return entered, per_step, torch.cuda.max_memory_allocated() / GIB


def measure_plan(variant: str, budgets: list[float], steps: int) -> None:
    """Planned vs measured peak of the DiT stage per budget, FP8 off and on."""
    from hyimage.diffusion.pipelines.parts import run_dit
    from hyimage.offload.planner import make_plan
    from hyimage.offload.request import PlanRequest

    device = torch.device("cuda")
    print(f"{'weights':>8} {'budget':>7} {'placement':>12} {'planned':>8} {'measured':>9} {'s/step':>8}")
    for fp8 in (False, True):
        model = random_dit(variant, fp8)
        batch = inputs(model, device)
        if model.config.guidance_embed:
            batch = {k: v[:1] for k, v in batch.items()}
            batch["guidance"] = torch.full((1,), 3250.0, device=device)
            batch["timesteps_r"] = batch["timestep"]
        for budget in budgets:
            stage = make_plan(PlanRequest(variant=variant, fp8=fp8, refiner=False), budget).stage("dit")
            label = stage.placement if stage.placement != "block" else f"block {stage.resident_blocks}"
            if stage.placement == "refused":
                print(f"{'fp8' if fp8 else 'bf16':>8} {budget:7g} {label:>12}")
                continue
            memory = MemoryManager(device, stage.mode, gpu_budget_gb=stage.weight_budget_gib)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with memory.running(model), torch.no_grad():
                positional = [batch[k] for k in ("hidden_states", "timestep", "text_states", "encoder_attention_mask")]
                extra = {k: v for k, v in batch.items() if k in ("byt5_text_states", "byt5_text_mask", "guidance",
                                                                  "timesteps_r")}
                run = functools.partial(run_dit, model, torch.bfloat16, *positional, **extra)
                run()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(steps):
                    run()
                torch.cuda.synchronize()
                per_step = (time.perf_counter() - start) / steps
            peak = torch.cuda.max_memory_allocated() / GIB
            print(f"{'fp8' if fp8 else 'bf16':>8} {budget:7g} {label:>12} {stage.predicted_peak_gib:8.2f} "
                  f"{peak:9.2f} {per_step:8.3f}")
            model.to("cpu")
            gc.collect()
        del model
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=None, help="GPU budgets (GiB) to measure the planned DiT stage at")
    parser.add_argument("--variant", default="hunyuanimage-v2.1")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budgets", default="0,8,16", help="block-mode weight budgets in GiB (0: stream every block)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: this benchmark needs a GPU; nothing measured.")
        return
    if args.plan:
        measure_plan(args.variant, [float(b) for b in args.plan.split(",")], args.steps)
        return
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, {args.variant}, 2048x2048, CFG batch 2, {args.steps} timed steps")
    print(f"{'weights':>8} {'mode':>16} {'enter s':>8} {'s/step':>8} {'peak GiB':>9} {'resident':>9}")
    for fp8 in (False, True):
        model = random_dit(args.variant, fp8)
        weights = "fp8" if fp8 else "bf16"
        modes = [("none", None), ("model", None)] + [("block", float(b) or None) for b in args.budgets.split(",")]
        for mode, budget in modes:
            memory = MemoryManager(device, mode, gpu_budget_gb=budget)
            label = mode if mode != "block" else f"block {budget or 0:g} GiB"
            try:
                entered, per_step, peak = measure(model, memory, args.steps)
            except torch.cuda.OutOfMemoryError:
                print(f"{weights:>8} {label:>16} {'out of memory':>27}")
                model.to("cpu")
                continue
            finally:
                gc.collect()
            resident = "all"
            if mode == "block":
                plan = memory.streamer(model).plan
                resident = f"{len(plan.resident)}/{len(plan.resident) + len(plan.streamed)}"
            print(f"{weights:>8} {label:>16} {entered:8.2f} {per_step:8.3f} {peak:9.2f} {resident:>9}")
            model.to("cpu")
        del model
        gc.collect()


if __name__ == "__main__":
    main()
