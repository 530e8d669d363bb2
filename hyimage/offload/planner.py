"""The memory plan: where each part of a call lives and how it runs, for a GPU and a host budget.

Stages, in the order a call runs them: reprompt, text encoder, glyph encoder, DiT loop, VAE decode, refiner
DiT loop, refiner VAE (encode and decode). Each stage gets one placement:
- "resident": every part stays on the GPU for the whole call (memory mode "none"; chosen only when all of
  them fit at once, with the largest stage's activations);
- "model": the stage's part is on the GPU while the stage runs (memory mode "model");
- "block": its block lists are streamed from host memory, the first k blocks resident (memory mode "block"
  with the weight budget that keeps exactly those k, see `hyimage.offload.streaming.resident_count`);
- "exact": a VAE whose whole decode does not fit decodes (and encodes) layer by layer over tiles, with the same
  numbers (`hyimage.models.vae.exact_tiling`), its weights on the GPU as in "model", its whole activations on the
  GPU or in pinned host memory with the tile size that fits;
- "refused": it cannot fit, with the reason.

Predicted peak of a stage = weights on the GPU + activation peak. Weights are exact: the DiTs are built on
`meta` (FP8 linears included) and their tensors counted per block; the VAEs' counts are the released
manifests'; the Qwen2.5-VL language models' come from their configurations (checked against meta builds in
tests/test_memory_plan.py); the ByT5 glyph encoder, the 32B's vision tower and the 7B reprompt model
(whose configuration was not seen) are approximate. The DiT's weight format (`PlanRequest.dit_file`,
`PlanRequest.gguf`) and its LoRAs (`PlanRequest.loras`) are counted as `hyimage.offload.dit_weights` describes.
Activation peaks are formulas in tokens x width
(transformers) and pixels x channels (VAEs); their coefficients are read from the code and, for the DiTs and
the VAE decodes, checked with the full-size simulator (benchmarks/memsim.py, which runs this package's code on
fake CUDA tensors): the planner's figure must bound the simulated peak. The encoders' activations (well under
1 GiB) are formulas only. A stage fits when peak + MARGIN <= budget; the margin holds what neither the formulas nor
the simulator see (CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation).

Host RAM (see `plan_host`): a part is built in host memory when its stage first needs it and kept, until a host
budget requires room: then, before a part is built, the parts held are released (dropped, and read again from disk
when next needed) farthest next use first, keeping back any that still fit, so only what the budget requires is
released and re-read. The host bytes of a part follow its GPU placement: "model" keeps the whole host copy (also
while the part is on the GPU); "block" keeps its rest and resident blocks pageable and its streamed blocks pinned,
each in one buffer of its size (`hyimage.offload.pinned`); "resident" parts leave host
memory when they move to the GPU (their host copy is transient, while loading). A stage whose part cannot fit
the host budget even alone (the 32B reprompt model in bf16 under 32 GiB) is refused with the way out.
"""

from dataclasses import asdict, dataclass, field

import torch

from hyimage.offload.dit_weights import dit_part
from hyimage.offload.host_plan import HOST_BASE_GIB, HostStep, plan_host
from hyimage.offload.needs import Need, stage_needs
from hyimage.offload.request import PlanRequest, dit_config, dit_summary, dit_weights_label
from hyimage.offload.streaming import resident_count
from hyimage.offload.weights import GIB
from hyimage.stages import DIT, REFINER_DIT, REPROMPT

MARGIN_FIXED_GIB = 0.75
"""CUDA context and library handles: about 0.5 GiB on recent GPUs (outside the allocator), cuBLAS workspaces."""
MARGIN_SHARE = 0.08
"""Allocator fragmentation and convolution workspaces, as a share of the GPU budget."""




@dataclass
class StagePlan:
    """One stage's placement and its predicted GPU peak (GiB); `host_gib` is host RAM in use during it."""

    stage: str
    placement: str
    predicted_peak_gib: float
    weights_gib: float
    activations_gib: float
    resident_blocks: int | None = None
    total_blocks: int | None = None
    weight_budget_gib: float | None = None
    host_gib: float = 0.0
    """Predicted host RAM peak of the stage (GiB): the process, the parts held and the part it builds."""
    host_held: list[str] = field(default_factory=list)
    """The parts in host memory while the stage runs (stage names; its own part included)."""
    host_released: list[str] = field(default_factory=list)
    """The parts released (dropped, read again when next needed) before this stage builds its part."""
    reason: str = ""
    tile_size: int | None = None
    """"exact": the tile side in pixels."""
    activations_on: str | None = None
    """"exact": where whole activations live, "gpu" or "host" (pinned)."""

    @property
    def mode(self) -> str:
        """The MemoryManager mode that runs this placement."""
        return {"resident": "none", "model": "model", "block": "block", "exact": "model"}.get(self.placement, "refused")


@dataclass
class Plan:
    """The per-stage plan for a request under a GPU and a host budget."""

    request: PlanRequest
    gpu_gib: float
    host_gib: float | None
    margin_gib: float
    stages: list[StagePlan]
    host_steps: "dict[str, HostStep]" = field(default_factory=dict)
    """Per stage, what host memory holds (see `plan_host`); the keeper of `hyimage.offload.host` follows it."""

    def stage(self, name: str) -> StagePlan | None:
        return next((s for s in self.stages if s.stage == name), None)

    @property
    def fits(self) -> bool:
        return all(s.placement != "refused" for s in self.stages)

    def to_dict(self) -> dict:
        request = asdict(self.request)
        request["dit_config"] = None if self.request.dit_config is None else str(self.request.dit_config)
        for key in ("loras", "refiner_loras"):
            request[key] = [{"name": lora.name, "layers": len(lora.ranks)} for lora in getattr(self.request, key)]
        return {
            "request": request,
            "dit_weights": dit_summary(self.request),
            "gpu_gib": self.gpu_gib,
            "host_gib": self.host_gib,
            "margin_gib": round(self.margin_gib, 3),
            "fits": self.fits,
            "stages": [
                {**asdict(s), "mode": s.mode, **{k: round(v, 3) for k, v in asdict(s).items() if isinstance(v, float)}}
                for s in self.stages
            ],
        }

    def __str__(self) -> str:
        r = self.request
        host = "unbounded" if self.host_gib is None else f"{self.host_gib:g} GiB"
        lines = [
            f"memory plan: {r.variant}{' FP8' if r.fp8 else ''}{dit_weights_label(r)}, {r.width}x{r.height}"
            f"{', refiner' if r.refiner else ''}{f', reprompt {r.reprompt}' if r.reprompt else ''}; "
            f"GPU {self.gpu_gib:g} GiB (margin {self.margin_gib:.2f} GiB kept free), host {host}",
        ]
        dit = dit_summary(r)
        lines.append(
            f"DiT weights ({dit['format']}): {dit['total_gib']:.2f} GiB, {dit['blocks']} blocks of up to "
            f"{dit['largest_block_gib']:.3f} GiB + {dit['rest_gib']:.2f} GiB outside them"
            + (f"; LoRA adapters {dit['lora_gib']:.3f} GiB of it" if r.loras else "")
        )
        lines.append(f"{'stage':<14}{'placement':<16}{'peak GiB':>9}{'weights':>9}{'activ.':>8}{'host GiB':>10}  note")
        for s in self.stages:
            placement = s.placement
            if s.placement == "block":
                placement = f"block {s.resident_blocks}/{s.total_blocks}"
            if s.placement == "exact":
                placement = f"exact {s.tile_size}px {s.activations_on}"
            lines.append(
                f"{s.stage:<14}{placement:<16}{s.predicted_peak_gib:>9.2f}{s.weights_gib:>9.2f}"
                f"{s.activations_gib:>8.2f}{s.host_gib:>10.1f}  {s.reason}"
            )
        lines.append(f"host GiB: the stage's host RAM peak, the process counted as {HOST_BASE_GIB:g} GiB; a part released "
                     "is read again from disk when next needed")
        return "\n".join(lines)


def margin_gib(gpu_gib: float) -> float:
    """GPU memory the plan keeps free for what it does not model (see MARGIN_FIXED_GIB, MARGIN_SHARE)."""
    return MARGIN_FIXED_GIB + MARGIN_SHARE * gpu_gib


def make_plan(request: PlanRequest, gpu_gib: float, host_gib: float | None = None) -> Plan:
    """The plan for `request` within `gpu_gib` of GPU memory (and `host_gib` of host RAM, None: unbounded)."""
    if gpu_gib <= 0:
        raise ValueError(f"the GPU budget must be positive, got {gpu_gib} GiB")
    margin = margin_gib(gpu_gib)
    room = (gpu_gib - margin) * GIB
    needs = stage_needs(request)
    resident_total = sum(n.part.total for n in needs if n.stage != REPROMPT)
    # resident parts stay on the GPU from one call to the next, so a reprompt model must fit beside them
    all_resident = resident_total + max(n.activations for n in needs) <= room and all(
        resident_total + n.part.total + n.activations <= room for n in needs if n.stage == REPROMPT
    )
    stages = [_stage_plan(need, room, all_resident, resident_total) for need in needs]
    by_stage = {s.stage: s for s in stages}
    steps = plan_host(host_bytes(request, by_stage), host_gib, HOST_BASE_GIB)
    for stage, need in zip(stages, needs):
        apply_host_step(stage, steps[stage.stage], need.host)
    return Plan(request, gpu_gib, host_gib, margin, stages, steps)


def host_bytes(request: PlanRequest, stages: dict[str, StagePlan] | None) -> dict[str, tuple[int, int, int]]:
    """(bytes held after the stage, bytes while it builds, bytes the stage adds while it runs) per stage part, for
    the GPU placements in `stages` (None: a call on the CPU, every part in host memory). A stage adds bytes while
    it runs when an exact tiled VAE keeps its whole activations in pinned host memory."""
    given = {stage: (held, loading) for stage, held, loading in request.host_part_bytes or ()}
    sizes = {}
    for need in stage_needs(request):
        held, loading = given.get(need.stage, (need.host, need.host))
        if need.stage in given and need.stage in (DIT, REFINER_DIT):  # the loader counts DiTs without LoRAs
            refiner = need.stage == REFINER_DIT
            if request.refiner_loras if refiner else request.loras:
                plain = (dit_part(dit_config(request, refiner=True), request.fp8) if refiner else
                         dit_part(dit_config(request), request.fp8, request.gguf, request.dit_file)).total
                held, loading = held + need.host - plain, loading + need.host - plain
        plan = None if stages is None else stages.get(need.stage)
        placement = None if plan is None else plan.placement
        if placement == "block" and need.part.pinned is not None:
            k = plan.resident_blocks
            held += sum(need.part.pinned[k:]) - sum(need.part.blocks[k:])
        running = need.exact_host if placement == "exact" and plan.activations_on == "host" else 0
        resident = placement == "resident"
        sizes[need.stage] = (0, loading, running) if resident else (held, max(held, loading), running)
    return sizes


def apply_host_step(stage: StagePlan, step: HostStep, loaded: int) -> None:
    """Write a stage's host figures into its plan; a refused part refuses the stage, naming the way out (`loaded`:
    the part's bytes as loaded, before any pinning)."""
    stage.host_gib, stage.host_held, stage.host_released = step.peak / GIB, step.held, step.released
    if step.refused:
        stage.placement = "refused"
        stage.reason = f"{step.refused} (the part as loaded: {loaded / GIB:.1f} GiB)"
    elif step.released:
        note = f"host: releases {', '.join(step.released)} first (read again when next needed)"
        stage.reason = f"{stage.reason}; {note}" if stage.reason else note


def _stage_plan(need: Need, room: float, all_resident: bool, resident_total: int) -> StagePlan:
    act = need.activations
    if all_resident and need.stage != REPROMPT:
        return StagePlan(need.stage, "resident", (resident_total + act) / GIB, resident_total / GIB, act / GIB,
                         reason="every part stays on the GPU")
    if all_resident:  # the reprompt model visits the GPU beside the resident parts (from the second call on)
        weights = resident_total + need.part.total
        return StagePlan(need.stage, "model", (weights + act) / GIB, weights / GIB, act / GIB,
                         reason="beside the resident parts")
    if need.part.total + act <= room:
        return StagePlan(need.stage, "model", (need.part.total + act) / GIB, need.part.total / GIB, act / GIB)
    weights, host_bytes = need.part.total, need.exact_host
    for on_gpu, tile, exact_act in need.exact:
        if weights + exact_act <= room:
            where = "on the GPU" if on_gpu else f"in pinned host memory ({host_bytes / GIB:.1f} GiB)"
            return StagePlan(need.stage, "exact", (weights + exact_act) / GIB, weights / GIB, exact_act / GIB,
                             tile_size=tile, activations_on="gpu" if on_gpu else "host",
                             reason=f"the whole decode needs {(weights + act) / GIB:.1f} GiB: exact tiled decode, "
                                    f"{tile}px tiles, activations {where}")
    if need.exact:
        act = min(exact_act for _, _, exact_act in need.exact)
    blocks = need.part.blocks
    floor = need.part.rest + 2 * max(blocks, default=0) + act
    if need.streamable and blocks and floor <= room:
        weight_budget = int(room - act)
        k = resident_count(need.part.rest, blocks, weight_budget)
        weights = need.part.rest + sum(blocks[:k]) + 2 * max(blocks[k:], default=0)
        return StagePlan(need.stage, "block", (weights + act) / GIB, weights / GIB, act / GIB, k, len(blocks),
                         weight_budget / GIB, reason=f"{len(blocks) - k} blocks streamed")
    minimum = floor if need.streamable and blocks else need.part.total + act
    return StagePlan(
        need.stage, "refused", minimum / GIB, (minimum - act) / GIB, act / GIB,
        reason=f"needs {minimum / GIB:.1f} GiB + margin of GPU memory at this size",
    )


def gpu_budget_gib(device: torch.device, gpu_budget_gb: float | None) -> float:
    """The budget given, else the free memory of `device` now."""
    if gpu_budget_gb is not None:
        return gpu_budget_gb
    free, _ = torch.cuda.mem_get_info(device)
    return free / GIB
