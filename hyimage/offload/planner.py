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
`PlanRequest.gguf`) and its LoRAs (`PlanRequest.loras`) are counted as "The DiT's weights" below describes.
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

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
    loras: tuple["LoraLayout", ...] = ()
    """LoRAs attached to the DiT (`lora_layout`, `lora_layouts`): their adapters stay on the GPU with the layers."""
    refiner_loras: tuple["LoraLayout", ...] = ()
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
class Part:
    """The weights of one part as the GPU sees them: the rest and each streamable block, in bytes."""

    rest: int
    blocks: list[int] = field(default_factory=list)
    pinned: list[int] | None = field(default=None, compare=False)
    """Per block, the host bytes of its tensors once pinned for streaming (each rounded up to a power of two); None
    when not known (then the plan counts the streamed blocks as they are)."""

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


# Weights.
def _decoder_layer_params(c: dict) -> int:
    head_dim = c["hidden"] // c["heads"]
    q_o = 2 * c["hidden"] * c["hidden"] + c["hidden"]  # q has a bias in Qwen2.5 (and not in Hunyuan: ~0)
    k_v = 2 * (c["hidden"] * c["kv_heads"] * head_dim + c["kv_heads"] * head_dim)
    mlp = 3 * c["hidden"] * c["intermediate"]
    return q_o + k_v + mlp + 2 * c["hidden"]


def _layer_tensor_params(c: dict) -> list[int]:
    h, kv = c["hidden"], c["kv_heads"] * (c["hidden"] // c["heads"])
    return [h * h, h, h * kv, kv, h * kv, kv, h * h, *[h * c["intermediate"]] * 3, h, h]


def pinned_size(nbytes: int) -> int:
    """Host bytes of a pinned copy: torch's caching host allocator rounds each allocation up to a power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def language_model(c: dict, layers: int, *, lm_head: bool, extra: int = 0, itemsize: int = 2) -> Part:
    """A decoder-only language model's weights: embeddings (+ head, + `extra` parameters) and its layers."""
    rest = c["vocab"] * c["hidden"] * (2 if lm_head else 1) + c["hidden"] + extra
    pinned = sum(pinned_size(n * itemsize) for n in _layer_tensor_params(c))
    return Part(rest * itemsize, [_decoder_layer_params(c) * itemsize] * layers, [pinned] * layers)


def module_part(module: nn.Module) -> Part:
    """The weights of a (meta or real) module, split as the block streamer splits them."""
    lists = find_block_lists(module)
    blocks = [block for _, blocks in lists for block in blocks]
    block_ids = {id(t) for block in blocks for t in (*block.parameters(), *block.buffers())}

    def nbytes(tensors: Any) -> int:
        unique = {id(t): t for t in tensors}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def pinned(tensors: Any) -> int:
        unique = {id(t): t for t in tensors}
        return sum(pinned_size(t.numel() * t.element_size()) for t in unique.values())

    rest = nbytes(t for t in (*module.parameters(), *module.buffers()) if id(t) not in block_ids)
    return Part(rest, [nbytes((*b.parameters(), *b.buffers())) for b in blocks],
                [pinned((*b.parameters(), *b.buffers())) for b in blocks])


def dit_config(request: PlanRequest, refiner: bool = False) -> Any:
    from hyimage.models.dit.configs import resolve_dit_config

    if refiner:
        return resolve_dit_config("hunyuanimage-refiner")
    return resolve_dit_config(request.dit_config if request.dit_config is not None else request.variant)


# The DiT's weights.
#
# bf16 / FP8: the DiT built on meta (FP8 linears converted as the loader converts them), counted per block.
# A DiT file: the DiT its loader builds from the file's header, on meta (`gguf_dit_on_meta`, `safetensors_dit_on_meta`):
# a GGUF file's quantised linears keep their ggml bytes (uint8), a safetensors file's float8 linears are FP8, everything
# else is loaded as bf16 (whatever the file stores), so the count equals the loaded model's, block by block.
# A GGUF type without a file: the DiT quantised as ComfyUI-GGUF's tools make such a file (see GGUF_KEPT); its
# linears' rows take `columns / block * block bytes` (the ggml block sizes, also the gguf package's
# GGML_QUANT_SIZES: Q8_0 34 bytes per 32 values, Q4_K 144 per 256, ...).
# A LoRA adds, on each layer it adapts, A (rank x in) and B (out x rank) in the layer's compute dtype (bf16 on CUDA)
# and its 0-dim float32 scale, in the block that holds the layer (they stream with it).
GGUF_KEPT = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
"""Weights ComfyUI-GGUF's llama.cpp patch (`tools/lcpp.patch`, `llama_tensor_get_type`) keeps in F32/F16 at every
quantisation type. Its `tools/convert.py` also keeps 1-D tensors and those of at most GGUF_SMALL values in F32, and
a row that is no whole number of the type's blocks falls back to F16; hyimage loads all of these as bf16."""
GGUF_SMALL = 1024
GGUF_DEQUANT_BYTES = {
    "Q8_0": 9.25, "Q6_K": 15.0, "Q5_K": 15.5, "Q5_1": 11.0, "Q5_0": 11.0, "Q4_K": 13.0, "Q4_1": 8.8, "Q4_0": 8.75,
    "Q3_K": 11.25, "Q2_K": 13.0,
}
"""Peak bytes per weight that `GGUFLinear` allocates while it dequantises its weight for one forward (int16 and
float32 intermediates of `hyimage.quantization.gguf`, the float32 result and its bf16 copy). Measured with
benchmarks/memsim.py's LiveBytes on a 1536 x 3584 layer: Q8_0 9.19, Q6_K 14.82, Q5_K 15.31, Q5_1 10.88,
Q5_0 10.81, Q4_K 12.94, Q4_1 8.75, Q4_0 8.69, Q3_K 11.18, Q2_K 12.98 (tests/test_plan_formats.py checks the bound).
The largest quantised layer's figure is added to the DiT's activations."""
GGUF_TYPES = tuple(GGUF_DEQUANT_BYTES)
"""The GGUF types a plan can estimate (those hyimage dequantises)."""
LORA_ITEMSIZE = 2
"""Adapters run in the layer's compute dtype: bf16 on CUDA (and for FP8 and GGUF layers, see `hyimage.lora.layers`)."""


@dataclass(frozen=True)
class LoraLayout:
    """One LoRA as the plan sees it: the DiT layers it adapts, each with its rank."""

    name: str
    ranks: tuple[tuple[str, int], ...]


@dataclass
class DiTWeights:
    """The DiT's weights on the GPU (`part`) and what its formats add to one forward's activations."""

    part: Part
    fp8: bool
    dequant_bytes: int = 0
    """The largest GGUF layer's dequantisation temporaries (GGUF_DEQUANT_BYTES x its weights)."""
    lora_rank: int = 0
    """The largest rank of the adapted layers, summed over the LoRAs (0: no LoRA)."""


@dataclass
class _DiTLayout:
    part: Part
    fp8: bool
    dequant_bytes: int
    blocks: dict[str, int]
    features: dict[str, tuple[int, int]]


def dit_format(request: PlanRequest) -> tuple[bool, str | None, str | None]:
    """(FP8 linears, GGUF type to estimate, DiT file) of the request's base DiT (a file decides its own FP8)."""
    if request.gguf is not None:
        return False, request.gguf, None
    if request.dit_file is None:
        return request.fp8, None, None
    path = Path(request.dit_file)
    if not path.is_file():
        raise FileNotFoundError(f"dit_file {path} does not exist; pass the path of a .safetensors or .gguf DiT")
    return False, None, str(path)


def dit_weights_label(request: PlanRequest) -> str:
    """How the plan's first line names the base DiT's format and the LoRAs of both DiTs."""
    label = ""
    if request.gguf is not None:
        label = f", DiT GGUF {request.gguf} (estimated)"
    elif request.dit_file is not None:
        label = f", DiT {Path(request.dit_file).name}"
    if request.loras:
        label += f", {len(request.loras)} LoRA{'s' if len(request.loras) > 1 else ''}"
    if request.refiner_loras:
        label += f", {len(request.refiner_loras)} refiner LoRA{'s' if len(request.refiner_loras) > 1 else ''}"
    return label


def dit_on_meta(config: Any, fp8: bool = False, gguf: str | None = None, dit_file: str | None = None) -> nn.Module:
    """The DiT of a DiTConfig on meta as it is loaded for a CUDA run: bf16, FP8 linears when `fp8`, GGUF linears of a
    type (`gguf`, see GGUF_KEPT), or as a DiT file loads (a GGUF file's quantised linears, a safetensors file's FP8
    ones), read from the file's header."""
    from hyimage.models.dit.model import HYImageDiffusionTransformer

    if dit_file is not None:
        from hyimage.loading.dit_loader import is_gguf, safetensors_dit_on_meta
        from hyimage.loading.gguf_loader import gguf_dit_on_meta

        read = gguf_dit_on_meta if is_gguf(Path(dit_file)) else safetensors_dit_on_meta
        return read(dit_file, config)
    with torch.device("meta"):
        model = HYImageDiffusionTransformer(**config.to_dict(), dtype=torch.bfloat16)
    if fp8:
        from hyimage.quantization.fp8 import convert_to_fp8_linear, fp8_linear_modules

        convert_to_fp8_linear(model, fp8_linear_modules(model))
    if gguf is not None:
        _quantize_like_gguf(model, gguf)
    return model.eval()


def _quantize_like_gguf(model: nn.Module, type_name: str) -> None:
    """Replace the linears a GGUF file of `type_name` quantises by (meta) GGUFLinear layers."""
    from hyimage.quantization.gguf import GGML_TYPES, GGUFLinear

    type_id = next(i for i, (name, _, _) in GGML_TYPES.items() if name == type_name)
    block = GGML_TYPES[type_id][1]
    for name, layer in list(model.named_modules()):
        if type(layer) is not nn.Linear or name.startswith(GGUF_KEPT):
            continue
        if layer.weight.numel() <= GGUF_SMALL or layer.in_features % block:
            continue
        has_bias = layer.bias is not None
        quantized = GGUFLinear(layer.in_features, layer.out_features, type_id, bias=has_bias,
                               device=torch.device("meta"), bias_dtype=layer.bias.dtype if has_bias else None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)


@functools.lru_cache(maxsize=16)
def _dit_layout(config_key: str, fp8: bool, gguf: str | None, dit_file: str | None, file_stamp: Any) -> _DiTLayout:
    from hyimage.lora.keys import linear_layers
    from hyimage.models.dit.configs import resolve_dit_config
    from hyimage.quantization.fp8 import FP8Linear
    from hyimage.quantization.gguf import GGUFLinear, type_name

    model = dit_on_meta(resolve_dit_config(json.loads(config_key)), fp8, gguf, dit_file)
    layers = linear_layers(model)
    dequant = max(
        (int(GGUF_DEQUANT_BYTES[type_name(layer.type_id)] * layer.in_features * layer.out_features)
         for layer in layers.values() if isinstance(layer, GGUFLinear)),
        default=0,
    )
    blocks = {f"{name}.{i}.": n for n, (name, i) in enumerate(
        (name, i) for name, block_list in find_block_lists(model) for i in range(len(block_list)))}
    features = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
    fp8 = any(isinstance(layer, FP8Linear) for layer in layers.values())
    return _DiTLayout(module_part(model), fp8, dequant, blocks, features)


def dit_part(config: Any, fp8: bool = False, gguf: str | None = None, dit_file: str | None = None,
             loras: tuple[LoraLayout, ...] = ()) -> Part:
    """The DiT's weights on the GPU for a DiTConfig (see `dit_on_meta`), with the adapters of `loras`."""
    return _dit_weights(config, fp8, gguf, dit_file, loras).part


def _dit_weights(config: Any, fp8: bool, gguf: str | None, dit_file: str | None,
                 loras: tuple[LoraLayout, ...]) -> DiTWeights:
    stamp = None
    if dit_file is not None:
        stat = Path(dit_file).stat()
        stamp = (str(Path(dit_file).resolve()), stat.st_size, stat.st_mtime_ns)
    layout = _dit_layout(json.dumps(config.to_dict(), sort_keys=True), fp8, gguf, dit_file, stamp)
    rest, blocks = layout.part.rest, list(layout.part.blocks)
    pinned = None if layout.part.pinned is None else list(layout.part.pinned)
    rank = sum(max((r for _, r in lora.ranks), default=0) for lora in loras)
    for lora in loras:
        for module, module_rank in lora.ranks:
            if module not in layout.features:
                raise ValueError(f"LoRA {lora.name!r} adapts {module}, which this DiT does not have")
            in_f, out_f = layout.features[module]
            nbytes = module_rank * (in_f + out_f) * LORA_ITEMSIZE + 4
            index = next((layout.blocks[p] for p in _prefixes(module) if p in layout.blocks), None)
            if index is None:
                rest += nbytes
            else:
                blocks[index] += nbytes
                if pinned is not None:
                    pinned[index] += pinned_size(nbytes)  # its A and B as one allocation: about their rounding
    return DiTWeights(Part(rest, blocks, pinned), layout.fp8, layout.dequant_bytes, rank)


def _prefixes(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) + "." for k in range(1, len(parts))]


def base_dit_weights(request: PlanRequest) -> DiTWeights:
    """The base DiT's weights for `request`: its format (bf16, FP8, a GGUF file or type) and its LoRAs."""
    fp8, gguf, dit_file = dit_format(request)
    return _dit_weights(dit_config(request), fp8, gguf, dit_file, request.loras)


def dit_summary(request: PlanRequest) -> dict:
    """The base DiT's weight format and its GPU bytes in GiB: in all, per block, outside the blocks, of the LoRAs."""
    fp8, gguf, dit_file = dit_format(request)
    weights = base_dit_weights(request)
    plain = _dit_weights(dit_config(request), fp8, gguf, dit_file, ()).part
    kind = "FP8" if weights.fp8 else "bf16"
    if dit_file is not None:
        from hyimage.loading.dit_loader import is_gguf

        kind = f"{'GGUF' if is_gguf(Path(dit_file)) else kind} file {Path(dit_file).name}"
    elif gguf is not None:
        kind = f"GGUF {gguf}, estimated"
    part = weights.part
    return {
        "format": kind,
        "total_gib": round(part.total / GIB, 3),
        "rest_gib": round(part.rest / GIB, 3),
        "blocks": len(part.blocks),
        "largest_block_gib": round(max(part.blocks, default=0) / GIB, 4),
        "lora_gib": round((part.total - plain.total) / GIB, 4),
        "bytes": part.total,
    }


def lora_layout(source: str | Path | dict[str, torch.Tensor], request: PlanRequest) -> LoraLayout:
    """A LoRA file (or state dict) as it would attach to the request's DiT (checked as `load_lora_weights` checks).
    A safetensors file is read from its header: its matrices as meta tensors, only the scalar alphas read."""
    from hyimage.lora.keys import ALPHA_SUFFIX, parse_lora
    from hyimage.lora.mixin import read_lora_file

    if isinstance(source, dict):
        state = source
    elif Path(source).suffix == ".safetensors" and Path(source).is_file():
        from hyimage.loading.safetensors_io import SafetensorsReader

        with SafetensorsReader(source) as reader:
            state = {k: reader.get(k) if k.endswith(ALPHA_SUFFIX) else reader.get_meta(k) for k in reader.keys()}
    else:
        state = read_lora_file(source)
    label = "lora" if isinstance(source, dict) else Path(source).stem
    described = "the LoRA state dict" if isinstance(source, dict) else str(source)
    updates, _, _ = parse_lora(state, dit_on_meta(dit_config(request)), source=described)
    if not updates:
        raise ValueError(f"{label} holds no LoRA matrix for the DiT's layers")
    return LoraLayout(label, tuple(sorted((u.module, int(u.down.shape[0])) for u in updates)))


def lora_layouts(dit: nn.Module) -> tuple[LoraLayout, ...]:
    """The LoRAs attached to a loaded DiT (`load_lora_weights`), as the plan counts them."""
    from hyimage.lora.layers import adapter_names, banks

    found = banks(dit)
    return tuple(
        LoraLayout(name, tuple(sorted((layer, int(bank._buffers[f"{name}_down"].shape[0]))
                                      for layer, bank in found.items() if name in bank.names)))
        for name in adapter_names(dit)
    )


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
        refiner_weights = _dit_weights(refiner_config, request.fp8, None, None, request.refiner_loras)
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

