"""The memory table: planned and simulated GPU peak per stage, per budget, FP8 on and off, 2K and 16:9.

    python -m benchmarks.memory_table [--budgets 24,16,12,8] [--sizes 2048x2048,2560x1536]

Planned: `hyimage.offload.planner.make_plan`. Simulated: the stage's real code on fake CUDA tensors at full
size (benchmarks/memsim.py). DiT stages run 1 double + 1 single block at full width and token count; the
weights of the full model that the plan keeps on the GPU are counted by the block streamer on its meta build
and added (activations are per-block transients, independent of depth); the text encoder likewise (1 decoder
layer simulated, the 26-layer model's placed weights counted). The glyph and reprompt models are planned from
formulas only ("-" under simulated). The VAE stages run as placed: whole, or exact tiled with the plan's tile
size and activation location; the refiner VAE row is the larger of its encode and its decode. Peaks in GiB; the
plan keeps its margin free on top. No GPU needed; a few minutes on 2 CPU cores.
"""

import argparse
import functools
import json
from dataclasses import replace

import torch

from benchmarks.memsim import (
    GIB,
    build_dit,
    qwen_text_model,
    simulate_dit,
    simulate_text_encoder,
    simulate_vae_decode,
)
from hyimage.models.dit.configs import resolve_dit_config
from hyimage.models.vae.exact_tiling import ExactTiling
from hyimage.offload.activations import TEMPLATE_TOKENS, TEXT_TOKENS
from hyimage.offload.needs import TEXT_ENCODER_LAYERS
from hyimage.offload.planner import make_plan
from hyimage.offload.request import PlanRequest, dit_config
from hyimage.offload.streaming import BlockStreamer

VARIANTS = {"distilled": "hunyuanimage-v2.1-distilled", "base": "hunyuanimage-v2.1"}


@functools.lru_cache(maxsize=8)
def _meta_dit(config_json: str, fp8: bool) -> torch.nn.Module:
    return build_dit(resolve_dit_config(json.loads(config_json)), fp8)


def full_weights_gib(config, fp8: bool, placement: str, weight_budget_gib: float | None) -> float:
    """GiB of the full DiT the memory manager keeps on the GPU for this placement."""
    dit = _meta_dit(json.dumps(config.to_dict(), sort_keys=True), fp8)
    if placement in ("model", "resident"):
        return sum(t.numel() * t.element_size() for t in (*dit.parameters(), *dit.buffers())) / GIB
    return BlockStreamer(dit, torch.device("cuda"), int(weight_budget_gib * GIB)).plan.device_bytes / GIB


@functools.lru_cache(maxsize=1)
def _meta_text_model() -> torch.nn.Module:
    return qwen_text_model(TEXT_ENCODER_LAYERS)


def text_encoder_weights_gib(placement: str, weight_budget_gib: float | None) -> float:
    """GiB of the 26-layer text model the memory manager keeps on the GPU for this placement."""
    model = _meta_text_model()
    if placement in ("model", "resident"):
        return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / GIB
    return BlockStreamer(model, torch.device("cuda"), int(weight_budget_gib * GIB)).plan.device_bytes / GIB


def dit_activations(config, fp8: bool, batch: int, width: int, height: int, refiner: bool) -> float:
    small = replace(config, mm_double_blocks_depth=1, mm_single_blocks_depth=1)
    if refiner:
        grid, text, glyph = (1, height // 16, width // 16), 256, 0
    else:
        grid, text, glyph = (height // 32, width // 32), 1000, 128
    return simulate_dit(small, fp8=fp8, batch=batch, image_tokens=grid, text_tokens=text, glyph_tokens=glyph)[
        "activations"
    ]


@functools.lru_cache(maxsize=64)
def vae_peak(stage: str, width: int, height: int, tile_size: int | None, activations_on: str | None) -> float:
    """Simulated peak of a VAE stage run whole (tile_size None) or exact tiled as planned."""
    exact = None if tile_size is None else ExactTiling(tile_size, None if activations_on == "gpu" else "cpu")
    peak = simulate_vae_decode(stage, width, height, exact=exact)["peak"]
    if stage == "refiner_vae":
        peak = max(peak, simulate_vae_decode(stage, width, height, True, exact)["peak"])
    return peak


def rows(budgets: list[float], sizes: list[tuple[int, int]]):
    for width, height in sizes:
        text_activations = simulate_text_encoder(TEXT_TOKENS + TEMPLATE_TOKENS)["activations"]
        for name, variant in VARIANTS.items():
            for fp8 in (True, False):
                request = PlanRequest(variant=variant, fp8=fp8, refiner=True, width=width, height=height)
                batch = 1 if name == "distilled" else 2
                acts = {
                    "dit": dit_activations(dit_config(request), fp8, batch, width, height, False),
                    "refiner_dit": dit_activations(dit_config(request, True), fp8, 1, width, height, True),
                }
                for budget in budgets:
                    plan = make_plan(request, budget)
                    for stage in plan.stages:
                        simulated = None
                        if stage.stage in acts and stage.placement != "refused":
                            config = dit_config(request, refiner=stage.stage == "refiner_dit")
                            weights = full_weights_gib(config, fp8, stage.placement, stage.weight_budget_gib)
                            simulated = weights + acts[stage.stage]
                        elif stage.stage in ("vae_decode", "refiner_vae") and stage.placement != "refused":
                            simulated = vae_peak(stage.stage, width, height, stage.tile_size, stage.activations_on)
                        elif stage.stage == "text_encoder" and stage.placement != "refused":
                            simulated = text_encoder_weights_gib(stage.placement, stage.weight_budget_gib)
                            simulated += text_activations
                        placement = stage.placement
                        if placement == "block":
                            placement = f"block {stage.resident_blocks}/{stage.total_blocks}"
                        if placement == "exact":
                            placement = f"exact {stage.tile_size}px {stage.activations_on}"
                        yield (f"{width}x{height}", name, "FP8" if fp8 else "bf16", budget, stage.stage, placement,
                               stage.predicted_peak_gib, simulated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="24,16,12,8,6")
    parser.add_argument("--sizes", default="2048x2048,2560x1536")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print("| size | model | weights | GPU GiB | stage | placement | planned peak | simulated peak |")
    print("|---|---|---|---|---|---|---|---|")
    for size, name, dtype, budget, stage, placement, planned, simulated in rows(budgets, sizes):
        shown = "-" if simulated is None else f"{simulated:.2f}"
        print(f"| {size} | {name} | {dtype} | {budget:g} | {stage} | {placement} | {planned:.2f} | {shown} |",
              flush=True)


if __name__ == "__main__":
    main()
