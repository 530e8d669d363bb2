"""The memory plan: where each part of a call lives and how it runs, for a GPU and a host budget.

Stages, in the order a call runs them: reprompt, text encoder, glyph encoder, DiT loop, VAE decode, refiner
DiT loop, refiner VAE (encode and decode). Each stage gets one placement:
- "resident": every part stays on the GPU for the whole call (memory mode "none"; chosen only when all of
  them fit at once, with the largest stage's activations);
- "model": the stage's part is on the GPU while the stage runs (memory mode "model");
- "block": its block lists are streamed from host memory, the first k blocks resident (memory mode "block"
  with the weight budget that keeps exactly those k, see `hyimage.offload.streaming.resident_count`);
- "refused": it cannot fit, with the reason.

Predicted peak of a stage = weights on the GPU + activation peak. Weights are exact: the DiTs are built on
`meta` (FP8 linears included) and their tensors counted per block; the VAEs' counts are the released
manifests'; the Qwen2.5-VL language models' come from their configurations (checked against meta builds in
tests/test_memory_plan.py); the ByT5 glyph encoder, the 32B's vision tower and the 7B reprompt model
(whose configuration was not seen) are approximate. Activation peaks are formulas in tokens x width
(transformers) and pixels x channels (VAEs); their coefficients are read from the code and, for the DiTs and
the VAE decodes, checked with the full-size simulator (benchmarks/memsim.py, which runs this package's code on
fake CUDA tensors): the planner's figure must bound the simulated peak. The encoders' activations (well under
1 GiB) are formulas only. A stage fits when peak + MARGIN <= budget; the margin holds what neither the formulas nor
the simulator see (CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation).

Host RAM: every part a call has built stays in host memory (parts load on first use and are kept), so the
host figure of a stage is the sum of the host copies built up to it; a plan whose host figure exceeds the
host budget says so per stage (nothing is released between stages yet).
"""

import functools
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hyimage.offload.streaming import find_block_lists, resident_count

GIB = 1024**3
MARGIN_FIXED_GIB = 0.75
"""CUDA context and library handles: about 0.5 GiB on recent GPUs (outside the allocator), cuBLAS workspaces."""
MARGIN_SHARE = 0.08
"""Allocator fragmentation and convolution workspaces, as a share of the GPU budget."""

DIT_ACTIVATION_UNITS = 24
"""Peak activations of a DiT forward in units of batch x tokens x hidden x 2 bytes. A single-stream block holds
its input, the modulated input (float32 under autocast: 2), q, k, v, the MLP input (4) and its activation (4),
their concatenation (5) and the output: about 20. The simulator measures 22.1 (distilled, bf16, 2048x2048),
22.1 (base, bf16, CFG batch 2, 2560x1536) and 23.2 (refiner, FP8, 2048x2048, with FP8's dequantized weights);
24 keeps a margin. FP8 adds the two bf16 temporaries of the largest dequantized weight (see
`dit_activation_bytes`): the distilled FP8 DiT at 2K simulates 0.98 GiB against 1.08 GiB planned."""
VAE_ACTIVATION_UNITS = {"vae_decode": 3.6, "refiner_vae": 3.6}
"""Peak VAE activations in units of one full-resolution activation (pixels x first-level channels x dtype
size): a resnet block at full resolution holds its input, the GroupNorm output, the SiLU output and the
convolution output. The simulator measures 3.5 for the 2D decode at 2048x2048 (7.0 GiB in float32; peak 8.5
with the weights) and 3.5 per frame for the refiner's 3D decode (fp16, one latent frame = two image frames:
7.0 GiB; peak 9.4); 3.6 keeps 3% over both (the simulator runs the same convolutions and norms, so its
count is exact up to workspaces). The refiner's 3D encode of a 2K image simulates 7.0 GiB too (peak 9.4).
Convolution workspaces are not planned beyond the margin: on the CPU one was about one full-resolution
activation, but cuDNN picks algorithms whose workspace fits the memory left free (measure it with benchmarks/bench_memory_modes_gpu.py where a GPU is lent)."""

# Parts whose sizes come from their released configurations (see the module docstring).
QWEN25VL_7B = dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064, layers=28)
TEXT_ENCODER_LAYERS = QWEN25VL_7B["layers"] - 2  # the last two decoder layers are never built (mllm.py)
QWEN25VL_32B = dict(hidden=5120, intermediate=27648, heads=40, kv_heads=8, vocab=152064, layers=64)
QWEN25VL_32B_VISION_PARAMS = 676_550_144  # the vision tower of Qwen2.5-VL-32B (loaded, not run on text)
HUNYUAN_7B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128167, layers=32)
"""The 7B PromptEnhancer's published Hunyuan-7B-Instruct configuration (its folder's config was not seen)."""
GLYPH_PARAMS = 218_000_000  # ByT5-small's encoder with the Glyph-SDXL-v2 token table, float32
VAE_PARAMS = {"vae_decode": 405_575_491, "refiner_vae": 1_260_634_115}  # the released manifests' num_params
VAE_FIRST_CHANNELS = {"vae_decode": 128, "refiner_vae": 128}
VAE_FACTOR = {"vae_decode": 32, "refiner_vae": 16}
GLYPH_TOKENS = 128
TEXT_TOKENS = 1000
REFINER_TEXT_TOKENS = 256
TEMPLATE_TOKENS = 36
REPROMPT_CONTEXT = 4096
"""Prompt plus the 2048 new tokens the reprompt model may write: its KV cache length."""

STAGES = ("reprompt", "text_encoder", "glyph_encoder", "dit", "vae_decode", "refiner_dit", "refiner_vae")
VARIANTS = ("hunyuanimage-v2.1", "hunyuanimage-v2.1-distilled")


@dataclass(frozen=True)
class PlanRequest:
    """What a plan is made for: the model, the options a call uses and the image size."""

    variant: str = "hunyuanimage-v2.1-distilled"
    fp8: bool = False
    refiner: bool = True
    reprompt: str | None = None
    width: int = 2048
    height: int = 2048
    dit_config: Any = None
    """The DiT's constructor arguments when not the variant's released ones (a dict, DiTConfig or name)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is unknown; choose one of {', '.join(VARIANTS)}")
        if self.reprompt not in (None, "7b", "32b"):
            raise ValueError(f"reprompt {self.reprompt!r} is unknown; choose '7b', '32b' or None")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 32 or value % 32:
                raise ValueError(f"{name}={value} must be a positive multiple of 32 (the VAE's factor)")


@dataclass
class Part:
    """The weights of one part as the GPU sees them: the rest and each streamable block, in bytes."""

    rest: int
    blocks: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.rest + sum(self.blocks)


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
    reason: str = ""

    @property
    def mode(self) -> str:
        """The MemoryManager mode that runs this placement."""
        return {"resident": "none", "model": "model", "block": "block"}.get(self.placement, "refused")


@dataclass
class Plan:
    """The per-stage plan for a request under a GPU and a host budget."""

    request: PlanRequest
    gpu_gib: float
    host_gib: float | None
    margin_gib: float
    stages: list[StagePlan]

    def stage(self, name: str) -> StagePlan | None:
        return next((s for s in self.stages if s.stage == name), None)

    @property
    def fits(self) -> bool:
        return all(s.placement != "refused" for s in self.stages)

    def to_dict(self) -> dict:
        request = asdict(self.request)
        request["dit_config"] = None if self.request.dit_config is None else str(self.request.dit_config)
        return {
            "request": request,
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
            f"memory plan: {r.variant}{' FP8' if r.fp8 else ''}, {r.width}x{r.height}"
            f"{', refiner' if r.refiner else ''}{f', reprompt {r.reprompt}' if r.reprompt else ''}; "
            f"GPU {self.gpu_gib:g} GiB (margin {self.margin_gib:.2f} GiB kept free), host {host}",
            f"{'stage':<14}{'placement':<16}{'peak GiB':>9}{'weights':>9}{'activ.':>8}{'host GiB':>10}  note",
        ]
        for s in self.stages:
            placement = s.placement
            if s.placement == "block":
                placement = f"block {s.resident_blocks}/{s.total_blocks}"
            lines.append(
                f"{s.stage:<14}{placement:<16}{s.predicted_peak_gib:>9.2f}{s.weights_gib:>9.2f}"
                f"{s.activations_gib:>8.2f}{s.host_gib:>10.1f}  {s.reason}"
            )
        return "\n".join(lines)


# Weights.
def _decoder_layer_params(c: dict) -> int:
    head_dim = c["hidden"] // c["heads"]
    q_o = 2 * c["hidden"] * c["hidden"] + c["hidden"]  # q has a bias in Qwen2.5 (and not in Hunyuan: ~0)
    k_v = 2 * (c["hidden"] * c["kv_heads"] * head_dim + c["kv_heads"] * head_dim)
    mlp = 3 * c["hidden"] * c["intermediate"]
    return q_o + k_v + mlp + 2 * c["hidden"]


def language_model(c: dict, layers: int, *, lm_head: bool, extra: int = 0, itemsize: int = 2) -> Part:
    """A decoder-only language model's weights: embeddings (+ head, + `extra` parameters) and its layers."""
    rest = c["vocab"] * c["hidden"] * (2 if lm_head else 1) + c["hidden"] + extra
    return Part(rest * itemsize, [_decoder_layer_params(c) * itemsize] * layers)


@functools.lru_cache(maxsize=16)
def _dit_part(config_key: str, fp8: bool) -> Part:
    from hyimage.models.dit.configs import resolve_dit_config
    from hyimage.models.dit.model import HYImageDiffusionTransformer

    config = resolve_dit_config(json.loads(config_key))
    with torch.device("meta"):
        model = HYImageDiffusionTransformer(**config.to_dict(), dtype=torch.bfloat16)
    if fp8:
        from hyimage.quantization.fp8 import convert_to_fp8_linear, fp8_linear_modules

        convert_to_fp8_linear(model, fp8_linear_modules(model))
    return module_part(model)


def module_part(module: nn.Module) -> Part:
    """The weights of a (meta or real) module, split as the block streamer splits them."""
    lists = find_block_lists(module)
    blocks = [block for _, blocks in lists for block in blocks]
    block_ids = {id(t) for block in blocks for t in (*block.parameters(), *block.buffers())}

    def nbytes(tensors: Any) -> int:
        unique = {id(t): t for t in tensors}
        return sum(t.numel() * t.element_size() for t in unique.values())

    rest = nbytes(t for t in (*module.parameters(), *module.buffers()) if id(t) not in block_ids)
    return Part(rest, [nbytes((*b.parameters(), *b.buffers())) for b in blocks])


def dit_config(request: PlanRequest, refiner: bool = False) -> Any:
    from hyimage.models.dit.configs import resolve_dit_config

    if refiner:
        return resolve_dit_config("hunyuanimage-refiner")
    return resolve_dit_config(request.dit_config if request.dit_config is not None else request.variant)


def dit_part(config: Any, fp8: bool) -> Part:
    """The DiT's weights for a DiTConfig, FP8 linears when `fp8` (other tensors bf16)."""
    return _dit_part(json.dumps(config.to_dict(), sort_keys=True), fp8)


# Activations.
def dit_tokens(request: PlanRequest, refiner: bool = False) -> tuple[int, int]:
    """(image tokens, text + glyph tokens) of one DiT forward."""
    factor = 16 if refiner else 32
    image = (request.width // factor) * (request.height // factor)
    text = REFINER_TEXT_TOKENS if refiner else TEXT_TOKENS + GLYPH_TOKENS
    return image, text


def dit_activation_bytes(config: Any, batch: int, image_tokens: int, text_tokens: int, fp8: bool) -> int:
    """Peak activations of one DiT forward (see DIT_ACTIVATION_UNITS), plus FP8 dequantization temporaries."""
    units = DIT_ACTIVATION_UNITS * batch * (image_tokens + text_tokens) * config.hidden_size * 2
    if fp8:
        mlp = int(config.hidden_size * config.mlp_width_ratio)
        units += 2 * (config.hidden_size + mlp) * config.hidden_size * 2  # weight.to(bf16) and its scaled copy
    return units


def vae_activation_bytes(stage: str, request: PlanRequest, itemsize: int) -> int:
    pixels = request.width * request.height
    frames = 2 if stage == "refiner_vae" else 1  # the refiner VAE decodes a frame pair
    return int(VAE_ACTIVATION_UNITS[stage] * pixels * VAE_FIRST_CHANNELS[stage] * itemsize * frames)


def text_activation_bytes(c: dict, tokens: int) -> int:
    """One prompt through a decoder layer: hidden states, q/k/v, the MLP's gate, up and product, in bf16, twice
    over (a batch of two prompts; the simulator measures 0.13 GiB for one padded 2K prompt, 0.30 planned)."""
    return 2 * tokens * (6 * c["hidden"] + 3 * c["intermediate"]) * 2


def reprompt_activation_bytes(c: dict) -> int:
    """The KV cache for REPROMPT_CONTEXT tokens, bf16, plus one step's float32 logits and a decoder layer."""
    head_dim = c["hidden"] // c["heads"]
    cache = 2 * c["layers"] * c["kv_heads"] * head_dim * REPROMPT_CONTEXT * 2
    return cache + c["vocab"] * 4 * 2 + text_activation_bytes(c, 1)


# The plan.
@dataclass
class _Need:
    stage: str
    part: Part
    activations: int
    host: int
    streamable: bool
    floor_note: str = ""


def _needs(request: PlanRequest) -> list[_Need]:
    needs: list[_Need] = []
    if request.reprompt == "32b":
        part = language_model(QWEN25VL_32B, QWEN25VL_32B["layers"], lm_head=True, extra=QWEN25VL_32B_VISION_PARAMS)
        needs.append(_Need("reprompt", part, reprompt_activation_bytes(QWEN25VL_32B), part.total, True))
    elif request.reprompt == "7b":
        part = language_model(HUNYUAN_7B, HUNYUAN_7B["layers"], lm_head=False)
        needs.append(_Need("reprompt", part, reprompt_activation_bytes(HUNYUAN_7B), part.total, True))
    text = language_model(QWEN25VL_7B, TEXT_ENCODER_LAYERS, lm_head=False)
    needs.append(_Need("text_encoder", text, text_activation_bytes(QWEN25VL_7B, TEXT_TOKENS + TEMPLATE_TOKENS),
                       text.total, True))
    base = dit_config(request)
    if base.glyph_byT5_v2:
        glyph = Part(GLYPH_PARAMS * 4)
        needs.append(_Need("glyph_encoder", glyph, 64 * 1024**2, glyph.total, False))
    distilled = bool(base.guidance_embed)
    dit = dit_part(base, request.fp8)
    batch = 1 if distilled else 2  # classifier-free guidance runs the base model on a batch of two
    needs.append(_Need("dit", dit, dit_activation_bytes(base, batch, *dit_tokens(request), request.fp8),
                       dit.total, True))
    vae = Part(VAE_PARAMS["vae_decode"] * 4)
    needs.append(_Need("vae_decode", vae, vae_activation_bytes("vae_decode", request, 4), vae.total, False,
                       "tiling would change the image, so the VAE decodes whole"))
    if request.refiner:
        refiner_config = dit_config(request, refiner=True)
        refiner = dit_part(refiner_config, request.fp8)
        needs.append(_Need("refiner_dit", refiner,
                           dit_activation_bytes(refiner_config, 1, *dit_tokens(request, True), request.fp8),
                           refiner.total, True))
        refiner_vae = Part(VAE_PARAMS["refiner_vae"] * 2)  # fp16 on the GPU, as the official
        needs.append(_Need("refiner_vae", refiner_vae, vae_activation_bytes("refiner_vae", request, 2),
                           VAE_PARAMS["refiner_vae"] * 4, False, "tiling would change the image"))
    return needs


def margin_gib(gpu_gib: float) -> float:
    """GPU memory the plan keeps free for what it does not model (see MARGIN_FIXED_GIB, MARGIN_SHARE)."""
    return MARGIN_FIXED_GIB + MARGIN_SHARE * gpu_gib


def make_plan(request: PlanRequest, gpu_gib: float, host_gib: float | None = None) -> Plan:
    """The plan for `request` within `gpu_gib` of GPU memory (and `host_gib` of host RAM, None: unbounded)."""
    if gpu_gib <= 0:
        raise ValueError(f"the GPU budget must be positive, got {gpu_gib} GiB")
    margin = margin_gib(gpu_gib)
    room = (gpu_gib - margin) * GIB
    needs = _needs(request)
    resident_total = sum(n.part.total for n in needs if n.stage != "reprompt")
    # resident parts stay on the GPU from one call to the next, so a reprompt model must fit beside them
    all_resident = resident_total + max(n.activations for n in needs) <= room and all(
        resident_total + n.part.total + n.activations <= room for n in needs if n.stage == "reprompt"
    )
    stages, host = [], 0
    for need in needs:
        host += need.host
        plan = _stage_plan(need, room, all_resident, resident_total)
        plan.host_gib = host / GIB
        if host_gib is not None and host > host_gib * GIB:
            plan.reason = (plan.reason + "; " if plan.reason else "") + (
                f"host RAM: {host / GIB:.1f} GiB of parts held by now exceeds the {host_gib:g} GiB host budget"
            )
        stages.append(plan)
    return Plan(request, gpu_gib, host_gib, margin, stages)


def _stage_plan(need: _Need, room: float, all_resident: bool, resident_total: int) -> StagePlan:
    act = need.activations
    if all_resident and need.stage != "reprompt":
        return StagePlan(need.stage, "resident", (resident_total + act) / GIB, resident_total / GIB, act / GIB,
                         reason="every part stays on the GPU")
    if all_resident:  # the reprompt model visits the GPU beside the resident parts (from the second call on)
        weights = resident_total + need.part.total
        return StagePlan(need.stage, "model", (weights + act) / GIB, weights / GIB, act / GIB,
                         reason="beside the resident parts")
    if need.part.total + act <= room:
        return StagePlan(need.stage, "model", (need.part.total + act) / GIB, need.part.total / GIB, act / GIB)
    blocks = need.part.blocks
    floor = need.part.rest + 2 * max(blocks, default=0) + act
    if need.streamable and blocks and floor <= room:
        weight_budget = int(room - act)
        k = resident_count(need.part.rest, blocks, weight_budget)
        weights = need.part.rest + sum(blocks[:k]) + 2 * max(blocks[k:], default=0)
        return StagePlan(need.stage, "block", (weights + act) / GIB, weights / GIB, act / GIB, k, len(blocks),
                         weight_budget / GIB, reason=f"{len(blocks) - k} blocks streamed")
    minimum = floor if need.streamable and blocks else need.part.total + act
    note = f"; {need.floor_note}" if need.floor_note else ""
    return StagePlan(
        need.stage, "refused", minimum / GIB, (minimum - act) / GIB, act / GIB,
        reason=f"needs {minimum / GIB:.1f} GiB + margin of GPU memory at this size{note}",
    )


def gpu_budget_gib(device: torch.device, gpu_budget_gb: float | None) -> float:
    """The budget given, else the free memory of `device` now."""
    if gpu_budget_gb is not None:
        return gpu_budget_gb
    free, _ = torch.cuda.mem_get_info(device)
    return free / GIB


STAGE_OF_CLASS = {
    "MLLMTextEncoder": "text_encoder",
    "GlyphByT5Encoder": "glyph_encoder",
    "HunyuanVAE2D": "vae_decode",
    "AutoencoderKLConv3D": "refiner_vae",
    "Reprompter": "reprompt",
}


def stage_of(module: Any) -> str | None:
    """The stage a pipeline part runs in, from its class (None for a part the plan does not know)."""
    name = type(module).__name__
    if name == "HYImageDiffusionTransformer":
        return "refiner_dit" if len(module.config.patch_size) == 3 else "dit"
    if name in STAGE_OF_CLASS:
        return STAGE_OF_CLASS[name]
    if name.endswith(("ForCausalLM", "ForConditionalGeneration")):
        return "reprompt"  # the reprompt model itself, run inside the Reprompter
    return None

