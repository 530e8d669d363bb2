"""Classifier-free guidance (CFG), adaptive projected guidance (APG) and the official per-sample mix of both.

The official `MIX_mode_0` runs CFG for the first steps and APG after them; a sample whose prompt asks
for rendered text (any valid glyph token) switches later than a general one. Here the switch is decided
per sample, so one batch may hold both kinds. The state (APG's momentum) lives in a `Guidance` object
made for one call.
"""

from dataclasses import dataclass

import torch

GUIDANCE_MODES = ("MIX_mode_0", "APG_mode_0", "cfg")


def rescale_noise_cfg(guided: torch.Tensor, pred_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Pull the guided prediction's per-sample std back towards the conditional one (arXiv 2305.08891, 3.4)."""
    dims = list(range(1, pred_cond.ndim))
    std_cond = pred_cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def cfg(
    pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond), optionally rescaled."""
    guided = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    if guidance_rescale > 0.0:
        guided = rescale_noise_cfg(guided, pred_cond, guidance_rescale)
    return guided


def apg(
    pred_cond: torch.Tensor,
    pred_uncond: torch.Tensor,
    diff: torch.Tensor,
    guidance_scale: float,
    eta: float,
    norm_threshold: float,
) -> torch.Tensor:
    """Adaptive projected guidance from an (already momentum-averaged) difference `diff` of cond and uncond.

    The difference is clipped to `norm_threshold` per sample, split into the parts parallel and orthogonal
    to `pred_cond` (in float64), and the parallel part is weighted by `eta`.
    """
    dims = [-i for i in range(1, diff.ndim)]
    if norm_threshold > 0:
        diff_norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / diff_norm)
    v0 = diff.double()
    v1 = torch.nn.functional.normalize(pred_cond.double(), dim=dims)
    parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    orthogonal = v0 - parallel
    update = orthogonal.type_as(diff) + eta * parallel.type_as(diff)
    return pred_uncond + guidance_scale * update


@dataclass(frozen=True)
class GuidanceConfig:
    """How guidance combines the conditional and unconditional predictions (official defaults).

    mode "MIX_mode_0": CFG up to and including step `apg_start_step_ocr` for text-rendering samples and
    `apg_start_step_general` for the others, APG after; "APG_mode_0": the switch after `apg_start_step`
    for all samples; "cfg": CFG at every step, with `guidance_rescale`.
    APG uses its own scale `apg_scale`, not the call's guidance scale.
    """

    mode: str = "MIX_mode_0"
    guidance_rescale: float = 0.0
    apg_scale: float = 10.0
    apg_momentum: float | None = -0.5
    apg_norm_threshold: float = 10.0
    apg_eta: float = 0.0
    apg_start_step: int = 10
    apg_start_step_ocr: int = 38
    apg_start_step_general: int = 5

    def __post_init__(self) -> None:
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance mode {self.mode!r} is unknown; choose one of {GUIDANCE_MODES}")


class Guidance:
    """The guidance of one call: per-sample CFG-to-APG switch steps and APG's momentum buffer.

    The switch steps are known on the host (from the OCR mask, once per call) and, for batches that mix both
    kinds, on the device as well: a step picks CFG or APG per sample with `torch.where`, never reading a
    value back from the device.
    """

    def __init__(self, config: GuidanceConfig, guidance_scale: float, ocr_mask: torch.Tensor) -> None:
        self.config = config
        self.guidance_scale = guidance_scale
        self.ocr_mask = ocr_mask.bool().cpu()
        if config.mode == "MIX_mode_0":
            starts = torch.where(self.ocr_mask, config.apg_start_step_ocr, config.apg_start_step_general)
        elif config.mode == "APG_mode_0":
            starts = torch.full(self.ocr_mask.shape, config.apg_start_step)
        else:
            starts = None
        self.apg_start_steps = starts
        self._host_starts = None if starts is None else starts.tolist()
        self._device_starts: dict[torch.device, torch.Tensor] = {}
        self.momentum: torch.Tensor | None = None

    def uses_apg(self, step: int) -> torch.Tensor:
        """Which samples take APG at `step` (CFG up to and including their start step)."""
        if self.apg_start_steps is None:
            return torch.zeros(self.ocr_mask.shape, dtype=torch.bool)
        return step > self.apg_start_steps

    def _apg_samples(self, step: int, like: torch.Tensor) -> torch.Tensor:
        """`uses_apg(step)` on `like`'s device, shaped to broadcast over a (B, ...) prediction."""
        starts = self._device_starts.get(like.device)
        if starts is None:
            starts = self._device_starts[like.device] = self.apg_start_steps.to(like.device)
        return (step > starts).reshape(-1, *([1] * (like.ndim - 1)))

    def __call__(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor, step: int) -> torch.Tensor:
        """The guided prediction at `step` (0-based) for a batch of conditional and unconditional predictions."""
        config = self.config
        if self.apg_start_steps is None:
            return cfg(pred_cond, pred_uncond, self.guidance_scale, config.guidance_rescale)

        diff = pred_cond - pred_uncond
        if config.apg_momentum is not None:
            if step == 0 or self.momentum is None:
                self.momentum = torch.zeros_like(diff)
            self.momentum = diff + config.apg_momentum * self.momentum
            diff = self.momentum

        apg_count = sum(step > start for start in self._host_starts)
        guided = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        if apg_count == 0:
            return guided
        projected = apg(pred_cond, pred_uncond, diff, config.apg_scale, config.apg_eta, config.apg_norm_threshold)
        projected = projected.to(guided.dtype)
        if apg_count == len(self._host_starts):
            return projected
        return torch.where(self._apg_samples(step, guided), projected, guided)
