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
`PlanRequest.gguf`) and its LoRAs (`PlanRequest.loras`) are counted as `hyimage.offload.weights` describes.
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
each pinned tensor rounded up to a power of two by torch's caching host allocator; "resident" parts leave host
memory when they move to the GPU (their host copy is transient, while loading). A stage whose part cannot fit
the host budget even alone (the 32B reprompt model in bf16 under 32 GiB) is refused with the way out.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hyimage.offload.streaming import resident_count
from hyimage.offload.weights import (
    GGUF_DEQUANT_BYTES,
    GIB,
    LORA_ITEMSIZE,
    DiTWeights,
    LoraLayout,
    Part,
    base_dit_weights,
    dit_config,
    dit_part,
    dit_summary,
    dit_weights,
    dit_weights_label,
    language_model,
)

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
VAE_CHANNELS = {"vae_decode": (128, 256, 512, 512, 1024, 1024), "refiner_vae": (128, 256, 512, 1024, 1024)}
"""The released configurations' block_out_channels (encoder order; the decoder runs them reversed)."""
VAE_FIRST_CHANNELS = {stage: channels[0] for stage, channels in VAE_CHANNELS.items()}
VAE_FACTOR = {"vae_decode": 32, "refiner_vae": 16}
VAE_TEMPORAL_LEVELS = {"vae_decode": 0, "refiner_vae": 2}
"""Decoder levels whose upsampling is also temporal: a single frame's conv makes 8x, not 4x, the channels."""
EXACT_TILES = ((True, 512), (True, 256), (False, 512), (False, 256), (False, 128))
"""Exact tiled VAE settings in the order tried, fastest first: (activations on the GPU, tile side in pixels)."""
EXACT_TILE_UNITS = {"vae_decode": 3.5, "refiner_vae": 4.5}
"""What one tile of the exact tiled VAE keeps live, in units of the widest fp16 tensor a tile op makes (a
resnet conv's input at float32 for its norm, or a resampling conv's output), halo included. Read off the
simulator at 2048x2048 (benchmarks/memsim.py, tiles of 512 and 256 pixels, activations on the GPU and on the
host): the 2D decode keeps 3.4 of them (its GroupNorm copies and SiLU), the 3D decode 4.3 (RMSNorm's float32
copies, the replication padding and the first frame's discarded half); the figure must bound every case.
Planned / simulated activations at 2K (GiB), tiles on the GPU / host: 2D decode 512 gpu 2.53 / 2.25, 256 gpu
2.11 / 2.06, 512 host 1.78 / 1.75, 256 host 0.90 / 0.81, 128 host 0.23 / 0.22; refiner decode 512 gpu 3.03 / 2.50,
256 gpu 2.70 / 2.06, 512 host 2.32 / 2.25, 256 host 2.32 / 1.63, 128 host 1.20 / 0.78 (its encode is lower in
every case: 2.25, 2.06, 1.25, 0.63, 0.25)."""
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
    dit_file: str | None = None
    """The DiT file loaded instead of the variant's (`from_pretrained(dit_file=...)`): a GGUF file's tensors are
    counted from its header; a safetensors file counts as FP8 when it stores float8 weights, else as bf16."""
    gguf: str | None = None
    """A GGUF quantisation type (Q4_K, Q8_0, ...): the DiT estimated as such a file would load (see GGUF_KEPT)."""
    loras: tuple[LoraLayout, ...] = ()
    """LoRAs attached to the DiT (`lora_layout`, `lora_layouts`): their adapters stay on the GPU with the layers."""
    refiner_loras: tuple[LoraLayout, ...] = ()
    """LoRAs attached to the refiner's DiT, counted as `loras` are for the base DiT."""
    host_part_bytes: tuple[tuple[str, int, int], ...] | None = None
    """(stage, bytes held once loaded, bytes while loading) of the parts in host memory, when not the released
    sizes read from the official files (the pipeline loader counts them for the checkpoint tree it loads:
    `hyimage.loading.part_sizes`)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is unknown; choose one of {', '.join(VARIANTS)}")
        if self.gguf is not None and self.gguf not in GGUF_DEQUANT_BYTES:
            raise ValueError(f"gguf type {self.gguf!r} is unknown; choose one of {', '.join(GGUF_DEQUANT_BYTES)}")
        if self.gguf is not None and self.dit_file is not None:
            raise ValueError("pass either a GGUF type (gguf) or a DiT file (dit_file), not both")
        if self.reprompt not in (None, "7b", "32b"):
            raise ValueError(f"reprompt {self.reprompt!r} is unknown; choose '7b', '32b' or None")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 32 or value % 32:
                raise ValueError(f"{name}={value} must be a positive multiple of 32 (the VAE's factor)")


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


def format_activation_bytes(weights: DiTWeights, config: Any, batch: int, tokens: int) -> int:
    """What the DiT's weight format and LoRAs add to one forward's activations (bytes).

    GGUF: the largest quantised layer's dequantisation temporaries (GGUF_DEQUANT_BYTES); the simulator measures
    0.71 GiB more than bf16 for the distilled Q4_K DiT at 2K (0.45 for Q8_0), against 0.93 (0.66) planned. LoRA: the
    side branch (`hyimage.lora.layers`) holds x @ A^T (tokens x rank) and, while the sum is made, the up-projection
    and its scaled copy of the layer's output. At the forward's peak (a single-stream block's hidden-wide output
    layer) that is two units of DIT_ACTIVATION_UNITS: the simulator measures exactly 2.0 more units with a rank-64
    LoRA on every block linear (distilled 2048x2048 and 1024x1024, base with CFG 2560x1536); planned: 2 + rank /
    hidden."""
    lora = batch * tokens * (2 * config.hidden_size + weights.lora_rank) * LORA_ITEMSIZE if weights.lora_rank else 0
    return weights.dequant_bytes + lora


def vae_activation_bytes(stage: str, request: PlanRequest, itemsize: int) -> int:
    pixels = request.width * request.height
    frames = 2 if stage == "refiner_vae" else 1  # the refiner VAE decodes a frame pair
    return int(VAE_ACTIVATION_UNITS[stage] * pixels * VAE_FIRST_CHANNELS[stage] * itemsize * frames)


def _exact_vae_layers(stage: str, request: PlanRequest) -> list[tuple[int, int, int, int]]:
    """The decoder's layers at image resolution: (height, width, widest channels a tile makes, elements of the
    whole activations it reads and writes)."""
    channels = tuple(reversed(VAE_CHANNELS[stage]))
    layers = []
    for i, c in enumerate(channels):
        shift = len(channels) - 1 - i
        h, w = request.height >> shift, request.width >> shift
        layers.append((h, w, 2 * c, h * w * 2 * c))  # a resnet conv
        if i < len(channels) - 1:  # the upsampling
            factor = 8 if i < VAE_TEMPORAL_LEVELS[stage] else 4
            layers.append((h, w, factor * channels[i + 1], h * w * (c + 4 * channels[i + 1])))
    return layers


def exact_vae_activation_bytes(stage: str, request: PlanRequest, tile: int, on_gpu: bool) -> int:
    """Peak GPU activations of the exact tiled VAE (decode, and the refiner's encode, which this bounds): per
    layer, the whole activations it reads and writes (when they live on the GPU; fp16 under autocast) plus one
    tile's working set (see EXACT_TILE_UNITS); the largest layer's sum."""
    peak = 0
    for h, w, widest, whole in _exact_vae_layers(stage, request):
        tile_bytes = EXACT_TILE_UNITS[stage] * (min(tile, h) + 4) * (min(tile, w) + 4) * widest * 2
        peak = max(peak, int(tile_bytes) + (whole * 2 if on_gpu else 0))
    return peak


def exact_vae_host_bytes(stage: str, request: PlanRequest) -> int:
    """Pinned host memory of the exact tiled VAE with its activations on the host: the largest layer's whole
    input and output, fp16."""
    return max(whole for _, _, _, whole in _exact_vae_layers(stage, request)) * 2


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
    exact: list[tuple[bool, int, int]] = field(default_factory=list)
    """A VAE's exact tiled settings, fastest first: (activations on the GPU, tile side, activation bytes)."""
    exact_host: int = 0
    """Pinned host bytes of the exact tiled VAE when its activations live on the host."""


def _exact_options(stage: str, request: PlanRequest) -> dict[str, Any]:
    options = [(gpu, tile, exact_vae_activation_bytes(stage, request, tile, gpu)) for gpu, tile in EXACT_TILES]
    return {"exact": options, "exact_host": exact_vae_host_bytes(stage, request)}


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
    weights = base_dit_weights(request)
    dit = weights.part
    batch = 1 if distilled else 2  # classifier-free guidance runs the base model on a batch of two
    tokens = dit_tokens(request)
    activations = dit_activation_bytes(base, batch, *tokens, weights.fp8)
    needs.append(_Need("dit", dit, activations + format_activation_bytes(weights, base, batch, sum(tokens)),
                       dit.total, True))
    vae = Part(VAE_PARAMS["vae_decode"] * 4)
    needs.append(_Need("vae_decode", vae, vae_activation_bytes("vae_decode", request, 4), vae.total, False,
                       **_exact_options("vae_decode", request)))
    if request.refiner:
        refiner_config = dit_config(request, refiner=True)
        refiner_weights = dit_weights(refiner_config, request.fp8, None, None, request.refiner_loras)
        refiner, refiner_tokens = refiner_weights.part, dit_tokens(request, True)
        activations = dit_activation_bytes(refiner_config, 1, *refiner_tokens, request.fp8)
        activations += format_activation_bytes(refiner_weights, refiner_config, 1, sum(refiner_tokens))
        needs.append(_Need("refiner_dit", refiner, activations, refiner.total, True))
        refiner_vae = Part(VAE_PARAMS["refiner_vae"] * 2)  # fp16 on the GPU, as the official
        needs.append(_Need("refiner_vae", refiner_vae, vae_activation_bytes("refiner_vae", request, 2),
                           VAE_PARAMS["refiner_vae"] * 4, False, **_exact_options("refiner_vae", request)))
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
    stages = [_stage_plan(need, room, all_resident, resident_total) for need in needs]
    by_stage = {s.stage: s for s in stages}
    steps = plan_host(host_bytes(request, by_stage), host_gib, HOST_BASE_GIB)
    for stage, need in zip(stages, needs):
        apply_host_step(stage, steps[stage.stage], need.host)
    return Plan(request, gpu_gib, host_gib, margin, stages, steps)


# Host RAM.
HOST_BASE_GIB = 2.0
"""The process itself on a CUDA machine: Python with torch and hyimage imported measures 0.24 GiB of RSS on the CPU
build (benchmarks/bench_host_plan.py); the CUDA context and the cuBLAS/cuDNN kernels it loads into host memory are
taken as the rest (not measured here)."""
HOST_BASE_CPU_GIB = 0.25
"""The same process on the CPU build (measured 0.24 GiB), for plans of calls that run on the CPU."""
HOST_ORDER = ("reprompt", "text_encoder", "glyph_encoder", "dit", "vae_decode", "refiner_vae", "refiner_dit")
"""The order in which a call builds its parts: the refiner VAE encodes the image before the refiner DiT runs."""
HELD_WITH = {"refiner_dit": ("refiner_vae",)}
"""Parts a stage never releases to make room: the refiner VAE decodes right after the refiner DiT."""


@dataclass
class HostStep:
    """What host memory holds while one stage runs (bytes, the process included) and what was released for it."""

    peak: int
    held: list[str]
    released: list[str]
    refused: str = ""


def host_bytes(request: PlanRequest, stages: dict[str, StagePlan] | None) -> dict[str, tuple[int, int, int]]:
    """(bytes held after the stage, bytes while it builds, bytes the stage adds while it runs) per stage part, for
    the GPU placements in `stages` (None: a call on the CPU, every part in host memory). A stage adds bytes while
    it runs when an exact tiled VAE keeps its whole activations in pinned host memory."""
    given = {stage: (held, loading) for stage, held, loading in request.host_part_bytes or ()}
    sizes = {}
    for need in _needs(request):
        held, loading = given.get(need.stage, (need.host, need.host))
        if need.stage in given and need.stage in ("dit", "refiner_dit"):  # the loader counts DiTs without LoRAs
            refiner = need.stage == "refiner_dit"
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
            if budget is not None and base + building + sum(held[s] for s in fixed) > budget:
                way_out = f"give a host budget of at least {math.ceil((base + building) / GIB)} GiB"
                if stage == "reprompt":
                    way_out = f"use the 7b reprompt model, no reprompt, or {way_out}"
                steps[stage] = HostStep(base + building, [], [], refused=(
                    f"host RAM: {building / GIB:.1f} GiB for this part + {base_gib:g} GiB for the process exceed the "
                    f"{host_gib:g} GiB host budget; {way_out}"))
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

