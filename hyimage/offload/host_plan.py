"""Host RAM across a call: which parts host memory holds at each stage within a host budget (`plan_host`).

A part is built in host memory when its stage first needs it and kept, until a host budget requires room: then,
before a part is built, the parts held are released (dropped, and read again from disk when next needed) farthest
next use first, keeping back any that still fit, so only what the budget requires is released and re-read. A part
that cannot fit the host budget even alone (the 32B reprompt model in bf16 under 32 GiB) is refused with the way out.
"""

import math
from dataclasses import dataclass

from hyimage.offload.weights import GIB
from hyimage.stages import DIT, GLYPH_ENCODER, REFINER_DIT, REFINER_VAE, REPROMPT, TEXT_ENCODER, VAE_DECODE

# Host RAM.
HOST_BASE_GIB = 2.0
"""The process itself on a CUDA machine: Python with torch and hyimage imported measures 0.24 GiB of RSS on the CPU
build (benchmarks/bench_host_plan.py); the CUDA context and the cuBLAS/cuDNN kernels it loads into host memory are
taken as the rest (not measured here)."""


HOST_BASE_CPU_GIB = 0.25
"""The same process on the CPU build (measured 0.24 GiB), for plans of calls that run on the CPU."""


HOST_ORDER = (REPROMPT, TEXT_ENCODER, GLYPH_ENCODER, DIT, VAE_DECODE, REFINER_VAE, REFINER_DIT)
"""The order in which a call builds its parts: the refiner VAE encodes the image before the refiner DiT runs."""


HELD_WITH = {REFINER_DIT: (REFINER_VAE,)}
"""Parts a stage never releases to make room: the refiner VAE decodes right after the refiner DiT."""


@dataclass
class HostStep:
    """What host memory holds while one stage runs (bytes, the process included) and what was released for it."""

    peak: int
    held: list[str]
    released: list[str]
    refused: str = ""


def plan_host(sizes: dict[str, tuple[int, int, int]], host_gib: float | None, base_gib: float) -> dict[str, HostStep]:
    """Which parts host memory holds at each stage of a call, within `host_gib` (None: unbounded, all kept).

    `sizes`: per stage, (bytes its part holds after the stage, bytes while it builds, bytes the stage adds while
    it runs: pinned activations, freed when it ends). Before a part is built,
    if the process, the parts held and the new part exceed the budget, the held parts are released farthest next
    use first (this call's later stages come before the next call's) until it fits; then any released part that
    still fits is kept back, nearest next use first. The figures are those of a second call, which starts with
    what the first left (a first call holds a subset of it at every stage, so it fits too). A part that cannot fit
    even alone is refused and left out."""
    base = int(base_gib * GIB)
    budget = None if host_gib is None else int(host_gib * GIB)
    order = [stage for stage in HOST_ORDER if stage in sizes]
    held: dict[str, int] = {}
    steps: dict[str, HostStep] = {}
    for _ in range(2):
        for i, stage in enumerate(order):
            after, building, running = sizes[stage]
            building = max(building, after + running)
            fixed = [s for s in HELD_WITH.get(stage, ()) if s in held]
            kept = sum(held[s] for s in fixed)
            if budget is not None and base + building + kept > budget:
                need = math.ceil((base + building + kept) / GIB)
                way_out = f"the stage alone needs a host budget of at least {need} GiB"
                if stage == REPROMPT:
                    way_out = f"use the 7b reprompt model or no reprompt; {way_out}"
                beside = "".join(f" + {held[s] / GIB:.1f} GiB for {s} (kept with it)" for s in fixed)
                steps[stage] = HostStep(base + building + kept, [], [], refused=(
                    f"host RAM: {building / GIB:.1f} GiB for this part{beside} + {base_gib:g} GiB for the process "
                    f"exceed the {host_gib:g} GiB host budget; {way_out}"))
                continue
            # a part built now needs its building bytes; a part already held, only what its stage adds while running
            extra = building if stage not in held else running

            def distance(other: str, here: int = i) -> int:
                return (order.index(other) - here) % len(order)

            released: list[str] = []
            others = sorted((s for s in held if s not in fixed and s != stage), key=distance, reverse=True)
            while budget is not None and others and base + extra + sum(held.values()) > budget:
                name = others.pop(0)
                held.pop(name)
                released.append(name)
            for name in sorted(released, key=distance):
                if base + extra + sum(held.values()) + sizes[name][0] <= budget:
                    released.remove(name)
                    held[name] = sizes[name][0]
            peak = base + extra + sum(held.values())
            held[stage] = after
            steps[stage] = HostStep(peak, list(held), released)
    return steps
