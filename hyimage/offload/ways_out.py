"""The ways out of a plan that refuses a stage: each change to the request or the budgets that the planner, run
again, finds to fit (`ways_out`); nothing is suggested that was not planned.

Tried in this order: FP8 DiT weights, no refiner, a smaller reprompt model (7B, then none), a Q4_K GGUF DiT; when
none of these fits alone, all of them at once; then a GPU with more free memory and more host RAM (the smallest whole
GiB that fits, found by bisection and planned again), with the options as given, else with all the changes.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from hyimage.offload.planner import Plan, make_plan
from hyimage.stages import REPROMPT

GGUF_WAY_OUT = "Q4_K"
"""The GGUF type suggested for the DiT when nothing else fits the host (its file is not part of the release)."""

MAX_GPU_GIB = 192
"""The largest GPU searched (an 8-GPU node's single card tops out below this)."""


@dataclass(frozen=True)
class WayOut:
    """One change that makes the plan fit: `options` of the request (fp8, refiner, reprompt) and budgets
    (`gpu_gib`, `host_gib`), with the plan that fits."""

    options: tuple[tuple[str, object], ...]
    plan: Plan

    def describe(self, style: str = "python") -> str:
        """The change as the user makes it: "python" (from_pretrained and call keywords), "generate" or "plan"
        (their command-line flags)."""
        return " + ".join(_say(name, value, style) for name, value in self.options)


_PYTHON = {
    ("fp8", True): "use_fp8=True",
    ("refiner", False): "refiner=False (or use_refiner=False in the call)",
    (REPROMPT, "7b"): 'reprompt_model="7b"',
    (REPROMPT, None): "use_reprompt=False",
    ("gguf", GGUF_WAY_OUT): f'dit_file="<a {GGUF_WAY_OUT} .gguf of the DiT>"',
}
_FLAGS = {
    ("fp8", True): "--fp8",
    ("refiner", False): "--no-refiner",
    (REPROMPT, "7b"): "--reprompt 7b",
    (REPROMPT, None): "no --reprompt",
    ("gguf", GGUF_WAY_OUT): f"--dit-file <a {GGUF_WAY_OUT} .gguf of the DiT>",
}


def _say(name: str, value: object, style: str) -> str:
    if name == "gpu_gib":
        flag = {"python": "gpu_budget_gb", "generate": "--gpu-budget-gb", "plan": "--gpu-gb"}[style]
        return f"a GPU with {value:g} GiB free ({flag}{'=' if style == 'python' else ' '}{value:g})"
    if name == "host_gib":
        flag = {"python": "host_budget_gb", "generate": "--host-budget-gb", "plan": "--ram-gb"}[style]
        return f"{value:g} GiB of host RAM available ({flag}{'=' if style == 'python' else ' '}{value:g})"
    if name == "gguf" and style == "plan":
        return f"--gguf {value}"
    return (_PYTHON if style == "python" else _FLAGS)[(name, value)]


def _option_changes(plan: Plan) -> list[tuple[str, object]]:
    request = plan.request
    changes: list[tuple[str, object]] = []
    if not request.fp8 and request.dit_file is None and request.gguf is None:
        changes.append(("fp8", True))
    if request.refiner:
        changes.append(("refiner", False))
    if request.reprompt == "32b":
        changes.append((REPROMPT, "7b"))
    if request.reprompt is not None:
        changes.append((REPROMPT, None))
    if request.gguf is None and request.dit_file is None:
        changes.append(("gguf", GGUF_WAY_OUT))
    return changes


def _smallest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The smallest whole number in (low, high] for which `fits` holds, assuming it holds from there on; None when it
    does not hold at `high`."""
    if high <= low or not fits(high):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _budgets(plan: Plan, request: object, options: tuple) -> list[WayOut]:
    found = []
    host = plan.host_gib
    gpu = _smallest(lambda g: make_plan(request, g, host).fits, math.floor(plan.gpu_gib), MAX_GPU_GIB)
    if gpu is not None:
        found.append(WayOut((*options, ("gpu_gib", gpu)), make_plan(request, gpu, host)))
    if host is not None:
        unbounded = make_plan(request, plan.gpu_gib, None)
        if unbounded.fits:
            top = math.ceil(max(s.host_gib for s in unbounded.stages))
            need = _smallest(lambda h: make_plan(request, plan.gpu_gib, h).fits, math.floor(host), max(top, 1))
            if need is not None:
                found.append(WayOut((*options, ("host_gib", need)), make_plan(request, plan.gpu_gib, need)))
    return found


def ways_out(plan: Plan) -> list[WayOut]:
    """The changes that make a refused `plan` fit, each planned again (empty when it fits or nothing found does)."""
    if plan.fits:
        return []
    found = []
    changes = _option_changes(plan)
    every = dict(changes)  # the last change of a name is the smallest (reprompt: none after 7b)
    request = replace(plan.request, **every)
    for name, value in changes:
        changed = make_plan(replace(plan.request, **{name: value}), plan.gpu_gib, plan.host_gib)
        if changed.fits:
            found.append(WayOut(((name, value),), changed))
    if not found and len(changes) > 1:
        combined = make_plan(request, plan.gpu_gib, plan.host_gib)
        if combined.fits:
            found.append(WayOut(tuple(every.items()), combined))
    budgets = _budgets(plan, plan.request, ())
    if not found and not budgets and changes:
        budgets = _budgets(plan, request, tuple(every.items()))
    return found + budgets


def refusal(plan: Plan, style: str = "python") -> str:
    """The refused stages of `plan` and the ways out, as one message."""
    refused = [s for s in plan.stages if s.placement == "refused"]
    lines = [f"the memory plan refuses the {s.stage} stage: {s.reason}" for s in refused]
    found = ways_out(plan)
    if found:
        lines.append("ways out that fit (each planned again): " + "; ".join(w.describe(style) for w in found))
    else:
        lines.append(f"no change of the options, nor a GPU up to {MAX_GPU_GIB} GiB or more host RAM, makes it fit at "
                     "this size: try a smaller image")
    return "\n".join(lines)
