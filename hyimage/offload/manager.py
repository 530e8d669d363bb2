"""Placement of pipeline parts around the stage that uses them.

Four memory modes, one switch:
- "auto":  each part as the memory plan places it (`hyimage.offload.planner`): resident, model-offloaded or
           streamed with the resident blocks its budget allows, a VAE placed "exact" decoding and encoding
           layer by layer over tiles with the plan's settings; the plan is made on the first stage that runs
           on CUDA, from `gpu_budget_gb` (else the free GPU memory then) and `host_budget_gb`. On other devices
           parts stay where they are (as "none"), and a VAE follows the plan only when `gpu_budget_gb` is given.
- "none":  every part moves to the device once and stays there (fastest, needs the most memory).
- "model": each part is on the device only while it runs (the official pipeline's offloading); its host
           copy stays in place, so leaving the stage drops the device copy instead of copying back.
- "block": like "model", and the parts made of block lists (the DiT, the text encoder) are
           streamed block by block from pinned host memory, keeping as many blocks resident
           as `gpu_budget_gb` allows (see `hyimage.offload.streaming`).
"""

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Protocol

import torch
from loguru import logger
from torch import nn

from hyimage.models.vae.exact_tiling import ExactTiling
from hyimage.offload.dit_weights import lora_layouts
from hyimage.offload.host import HostKeeper
from hyimage.offload.host_plan import (
    HOST_BASE_CPU_GIB,
    HOST_BASE_GIB,
    HostStep,
    plan_host,
)
from hyimage.offload.machine import auto_host_budget_gib, check_host_budget
from hyimage.offload.planner import Plan, gpu_budget_gib, host_bytes, make_plan
from hyimage.offload.request import PlanRequest
from hyimage.offload.streaming import BlockStreamer, DeviceCopy
from hyimage.offload.ways_out import refusal
from hyimage.stages import CORE_STAGES, DIT, REFINER_DIT, REFINER_VAE, VAE_DECODE

MEMORY_MODES = ("auto", "none", "model", "block")


class Movable(Protocol):
    def to(self, device: torch.device) -> object: ...


def stage_of(module: object, stage: str | None = None) -> str | None:
    """The memory-plan stage `module` runs in: `stage` when given, else the one the part declares
    (`memory_stage`, see `hyimage.stages`); None for a part the plan does not know."""
    return stage if stage is not None else getattr(module, "memory_stage", None)


class MemoryManager:
    """Moves a part onto the execution device for the stage that runs it.

    `gpu_budget_gb` (GiB, as every "gb" here) bounds the weights a streamed part keeps on the device in mode "block"
    (activations come on top); None streams every block. `host_budget_gb` bounds host RAM in every mode: `host`
    releases parts between stages as the plan's host figures say (see `hyimage.offload.host`); "auto" is what the
    machine can give when it is first needed (`hyimage.offload.machine`), None or inf no limit.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        mode: str = "none",
        gpu_budget_gb: float | None = None,
        offload_device: str | torch.device = "cpu",
        host_budget_gb: float | str | None = None,
        request: PlanRequest | None = None,
    ) -> None:
        if mode not in MEMORY_MODES:
            raise ValueError(f"memory mode {mode!r} is unknown; choose one of {', '.join(MEMORY_MODES)}")
        if gpu_budget_gb is not None and gpu_budget_gb <= 0:
            raise ValueError(f"gpu_budget_gb must be positive, got {gpu_budget_gb}")
        self.device = torch.device(device)
        self.mode = mode
        self.gpu_budget_gb = gpu_budget_gb
        self.offload_device = torch.device(offload_device)
        self.host_budget_gb = check_host_budget(host_budget_gb)
        self._host_budget: tuple[str, float | None] | None = None
        self.request = request
        """What the "auto" plan is made for (the loader sets it); None plans the released distilled model at 2K."""
        self.part_sizes: Callable[[torch.device], dict[str, tuple[int, int]]] | None = None
        """Per stage part of the checkpoints loaded, its host bytes once loaded and while loading, for a device (the
        loader sets it); None: the released sizes."""
        self.host = HostKeeper(self.host_plan, self.forget_within, self.check_stage)
        self._plan: Plan | None = None
        self._host_plan: dict[str, HostStep] | None = None
        self._streamers: weakref.WeakKeyDictionary[nn.Module, BlockStreamer] = weakref.WeakKeyDictionary()

    def to(self, device: str | torch.device) -> "MemoryManager":
        """Run parts on `device` from now on."""
        self.device = torch.device(device)
        self._streamers.clear()
        self._plan = None
        self._host_plan = None
        return self

    def _request(self) -> PlanRequest:
        request = self.request if self.request is not None else PlanRequest()
        if self.part_sizes is not None and request.host_part_bytes is None:
            sizes = self.part_sizes(self.device)
            request = replace(request, host_part_bytes=tuple((stage, *sizes[stage]) for stage in sorted(sizes)))
        return request

    @property
    def plan(self) -> Plan:
        """The memory plan of mode "auto" for the current device and budgets (made once per device)."""
        if self._plan is None:
            gpu = gpu_budget_gib(self.device, self.gpu_budget_gb)
            self._plan = make_plan(self._request(), gpu, self.host_budget_gib())
            logger.info(f"{self._plan}")
        return self._plan

    def host_plan(self) -> dict[str, HostStep] | None:
        """Per stage, what host memory holds within `host_budget_gb` (None without one, or in mode "none" on CUDA,
        where parts are read straight onto the GPU: nothing is released). On CUDA in mode "auto", the plan's (its GPU
        placements set the host bytes); elsewhere every part counts whole."""
        if self.host_budget_gib() is None or (self.mode == "none" and self.device.type == "cuda"):
            return None
        if self._host_plan is None:
            if self.mode == "auto" and self.device.type == "cuda":
                self._host_plan = self.plan.host_steps
            else:
                base = HOST_BASE_GIB if self.device.type == "cuda" else HOST_BASE_CPU_GIB
                self._host_plan = plan_host(host_bytes(self._request(), None), self.host_budget_gib(), base)
        return self._host_plan

    def host_budget_gib(self) -> float | None:
        """The host budget planned for (GiB; None: no limit): `host_budget_gb`, "auto" read from the machine once
        for the device type (the process counted as the plan counts it)."""
        kind = self.device.type
        if self._host_budget is None or self._host_budget[0] != kind:
            value = self.host_budget_gb
            if value == "auto":
                value = auto_host_budget_gib(HOST_BASE_GIB if kind == "cuda" else HOST_BASE_CPU_GIB)
                logger.info(f"host budget: {value:.1f} GiB (what this machine can give now, less a margin)")
            self._host_budget = (kind, None if value is None or math.isinf(value) else value)
        return self._host_budget[1]

    def check_stage(self, stage: str) -> None:
        """Refuse, with the ways out, before `stage` reads its part, when mode "auto" on CUDA plans no room for it or
        for a stage every call runs."""
        if self.mode != "auto" or self.device.type != "cuda":
            return
        plan = self.plan
        if any(s.placement == "refused" and (s.stage == stage or s.stage in CORE_STAGES) for s in plan.stages):
            raise MemoryError(f"{refusal(plan)}\n(`hyimage plan --gpu-gb {plan.gpu_gib:g}` shows every stage)")

    def placement(self, module: object, stage: str | None = None) -> tuple[str, float | None]:
        """The mode ("none", "model" or "block") and weight budget (GB) that `module` runs with."""
        if self.mode != "auto":
            return self.mode, self.gpu_budget_gb
        if self.device.type != "cuda":
            return "none", None
        planned = self.plan.stage(stage_of(module, stage) or "")
        if planned is None:
            return "model", None
        # every call runs the core stages: refuse at the first of them rather than after the denoising loop
        self.check_stage(planned.stage)
        return planned.mode, planned.weight_budget_gib

    def exact_tiling(self, module: object, stage: str | None = None) -> ExactTiling | None:
        """The exact tiled VAE settings of mode "auto" for `module` when the plan places its stage "exact"."""
        name = stage_of(module, stage)
        if self.mode != "auto" or name not in (VAE_DECODE, REFINER_VAE):
            return None
        if self.device.type != "cuda" and self.gpu_budget_gb is None:
            return None
        planned = self.plan.stage(name)
        if planned is None or planned.placement != "exact":
            return None
        return ExactTiling(planned.tile_size, None if planned.activations_on == "gpu" else "cpu")

    @contextmanager
    def running(self, module: Movable, stage: str | None = None) -> Iterator[Movable]:
        """Context in which `module` is ready to run on `self.device` (a VAE placed "exact" in exact tiling)."""
        stage = stage_of(module, stage)
        settings = self.exact_tiling(module, stage)
        if settings is None:
            with self._placed(module, stage) as placed:
                yield placed
            return
        if settings.activations_device is not None:  # its pinned activations may need parts released first
            self.host.before_build(stage)
        previous = module.exact_tiling
        module.exact_tiling = settings
        try:
            with self._placed(module, stage) as placed:
                yield placed
        finally:
            module.exact_tiling = previous

    @contextmanager
    def _placed(self, module: Movable, stage: str | None) -> Iterator[Movable]:
        mode, _ = self.placement(module, stage)
        if mode == "none":
            module.to(self.device)
            yield module
            return
        if not isinstance(module, nn.Module):
            module.to(self.device)
            try:
                yield module
            finally:
                module.to(self.offload_device)
            return
        placer = self.streamer(module, stage) if mode == "block" else None
        if placer is None:
            placer = DeviceCopy(module, self.device, self.offload_device)
        placer.attach()
        try:
            yield module
        finally:
            placer.detach()

    def forget(self, module: Movable) -> None:
        """Drop the block streamer of `module`, so the next run streams its tensors as they are now."""
        if isinstance(module, nn.Module):
            self._streamers.pop(module, None)

    def adapters_changed(self, module: Movable, stage: str | None = None) -> None:
        """`module`'s LoRAs changed: forget its streamer and, for a DiT in mode "auto", plan again with them."""
        self.forget(module)
        stage = stage_of(module, stage)
        if self.mode != "auto" or not isinstance(module, nn.Module) or stage not in (DIT, REFINER_DIT):
            return
        request = self.request if self.request is not None else PlanRequest()
        field = "loras" if stage == DIT else "refiner_loras"
        loras = lora_layouts(module)
        if loras != getattr(request, field):
            self.request = replace(request, **{field: loras})
            self._plan = None
            self._host_plan = None
            self._streamers.clear()

    def cache_changed(self, stage: str, cache: tuple[str, tuple] | None) -> None:
        """The step cache of the DiT of `stage` changed: in mode "auto", plan again with its tensors counted."""
        if self.mode != "auto":
            return
        request = self.request if self.request is not None else PlanRequest()
        field = "cache" if stage == DIT else "refiner_cache"
        if getattr(request, field) != cache:
            self.request = replace(request, **{field: cache})
            self._plan = None
            self._host_plan = None
            self._streamers.clear()

    def forget_within(self, part: object) -> None:
        """Drop the block streamers of `part` and of every module inside it (a released part: they hold it)."""
        if isinstance(part, nn.Module):
            inside = {id(m) for m in part.modules()}
            for module in [m for m in self._streamers if id(m) in inside]:
                self._streamers.pop(module, None)

    def streamer(self, module: Movable, stage: str | None = None) -> BlockStreamer | None:
        """The block streamer of `module`, or None when it has no block lists to stream."""
        if not isinstance(module, nn.Module):
            return None
        if module not in self._streamers:
            _, budget_gb = self.placement(module, stage)
            budget = None if budget_gb is None else int(budget_gb * 1024**3)
            streamer = BlockStreamer(module, self.device, budget, self.offload_device)
            if not streamer.plan.resident and not streamer.plan.streamed:
                return None
            self._streamers[module] = streamer
        return self._streamers[module]
