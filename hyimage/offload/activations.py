"""Activation peaks of each stage, as formulas in tokens x width (transformers) and pixels x channels (VAEs).

Their coefficients are read from the code and, for the DiTs and the VAE decodes, checked with the full-size
simulator (benchmarks/memsim.py, which runs this package's code on fake CUDA tensors): the planner's figure must
bound the simulated peak. The encoders' activations (well under 1 GiB) are formulas only.
"""

from typing import Any

from hyimage.offload.dit_weights import LORA_ITEMSIZE, DiTWeights
from hyimage.offload.request import PlanRequest
from hyimage.stages import REFINER_VAE, VAE_DECODE

DIT_ACTIVATION_UNITS = 20
"""Peak activations of a DiT forward in units of batch x tokens x hidden x 2 bytes. The peak comes in a
single-stream block while k is rotated: its input, the fused q|k|v|mlp projection's output (7), q rotated and
joined (2), and the rotation's float32 temporaries of k's image part (3 copies: 6). The simulator (one double and
one single block at full width, as `benchmarks/memory_table.py`'s DiT rows run it) measures 17.6 (distilled, bf16,
2048x2048), 17.5 (base, bf16, CFG batch 2, 2560x1536) and 19.0 (refiner, bf16 or FP8, 2048x2048: almost all its
tokens are image tokens); 20 keeps 5% over the largest. It was 24 (simulated 23.1, 23.1, 24.2) before issue 24:
the blocks now free the projections' outputs, the modulated input and the attention output as soon as they are
read, and the rotation writes into its own temporaries."""


DEQUANT_LIVE_UNITS = 13
"""Activations live, in DIT_ACTIVATION_UNITS' units, while a quantised DiT dequantises its largest weights (FP8:
a single-stream block's linear1 group, GGUF: its `linear2`): the block's input, its modulated input (float32 under
autocast: 2) or the attention output, the MLP activation (4) and the concatenation (5): about 10 to 12 (the
simulator: 9.7 for FP8, 12.0 for Q4_K, distilled at 2K); 13 keeps a margin. The forward's own peak (the rotation,
DIT_ACTIVATION_UNITS) comes at another moment; a plan takes the larger of the two."""


VAE_ACTIVATION_UNITS = {VAE_DECODE: 3.6, REFINER_VAE: 3.6}
"""Peak VAE activations in units of one full-resolution activation (pixels x first-level channels x dtype
size): a resnet block at full resolution holds its input, the GroupNorm output, the SiLU output and the
convolution output. The simulator measures 3.5 for the 2D decode at 2048x2048 (7.0 GiB in float32; peak 8.5
with the weights) and 3.5 per frame for the refiner's 3D decode (fp16, one latent frame = two image frames:
7.0 GiB; peak 9.4); 3.6 keeps 3% over both (the simulator runs the same convolutions and norms, so its
count is exact up to workspaces). The refiner's 3D encode of a 2K image simulates 7.0 GiB too (peak 9.4).
Convolution workspaces are not planned beyond the margin: on the CPU one was about one full-resolution
activation, but cuDNN picks algorithms whose workspace fits the memory left free (measure it with benchmarks/bench_memory_modes_gpu.py where a GPU is lent)."""


VAE_CHANNELS = {VAE_DECODE: (128, 256, 512, 512, 1024, 1024), REFINER_VAE: (128, 256, 512, 1024, 1024)}
"""The released configurations' block_out_channels (encoder order; the decoder runs them reversed)."""


VAE_FIRST_CHANNELS = {stage: channels[0] for stage, channels in VAE_CHANNELS.items()}


VAE_FACTOR = {VAE_DECODE: 32, REFINER_VAE: 16}


VAE_TEMPORAL_LEVELS = {VAE_DECODE: 0, REFINER_VAE: 2}
"""Decoder levels whose upsampling is also temporal: a single frame's conv makes 8x, not 4x, the channels."""


EXACT_TILES = ((True, 512), (True, 256), (False, 512), (False, 256), (False, 128))
"""Exact tiled VAE settings in the order tried, fastest first: (activations on the GPU, tile side in pixels)."""


EXACT_TILE_UNITS = {VAE_DECODE: 3.5, REFINER_VAE: 4.5}
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


# Activations.
def dit_tokens(request: PlanRequest, refiner: bool = False) -> tuple[int, int]:
    """(image tokens, text + glyph tokens) of one DiT forward."""
    factor = 16 if refiner else 32
    image = (request.width // factor) * (request.height // factor)
    text = REFINER_TEXT_TOKENS if refiner else TEXT_TOKENS + GLYPH_TOKENS
    return image, text


def dit_activation_bytes(config: Any, batch: int, image_tokens: int, text_tokens: int, fp8: bool) -> int:
    """Peak activations of one DiT forward (see DIT_ACTIVATION_UNITS); FP8: or, when larger, what is live while a
    single-stream block's linear1 group is dequantised (DEQUANT_LIVE_UNITS and `fp8_dequant_bytes`)."""
    unit = batch * (image_tokens + text_tokens) * config.hidden_size * 2
    if not fp8:
        return DIT_ACTIVATION_UNITS * unit
    return max(DIT_ACTIVATION_UNITS * unit, DEQUANT_LIVE_UNITS * unit + fp8_dequant_bytes(config))


def fp8_dequant_bytes(config: Any) -> int:
    """An FP8 DiT's largest dequantisation temporaries: a single-stream block's linear1 group (q|k|v|mlp) as one
    bf16 buffer (`hyimage.models.dit.fused`) and the float32 copy of its largest part (mlp) made on the way (the
    autocast path: float32 inputs). The group run part by part (LoRA hooks, compiled blocks) needs at most the
    same: two float32 copies of the mlp part and its bf16 cast are 10 of the 11 mlp x hidden x 2 bytes counted."""
    mlp = int(config.hidden_size * config.mlp_width_ratio)
    return (3 * config.hidden_size + mlp) * config.hidden_size * 2 + mlp * config.hidden_size * 4


def format_activation_bytes(weights: DiTWeights, config: Any, batch: int, tokens: int) -> int:
    """What the DiT's weight format and LoRAs add to one forward's activations (bytes).

    GGUF: the largest quantised layer's dequantisation temporaries (GGUF_DEQUANT_BYTES) on top of what is live
    then (DEQUANT_LIVE_UNITS), where that exceeds the forward's peak. The simulator measures 1.20 GiB of activations
    for the distilled Q4_K DiT at 2K against 1.39 GiB planned. LoRA: the side branch (`hyimage.lora.layers`) holds
    x @ A^T (tokens x rank) and, while the sum is made, the up-projection and its scaled copy of the layer's output:
    at most two units of DIT_ACTIVATION_UNITS (the simulator: 0.70 GiB with a rank-64 LoRA on every block linear,
    distilled 2K, against 0.84 planned); planned: 2 + rank / hidden."""
    unit = batch * tokens * config.hidden_size * 2
    gguf = max(0, DEQUANT_LIVE_UNITS * unit + weights.dequant_bytes - DIT_ACTIVATION_UNITS * unit)
    lora = batch * tokens * (2 * config.hidden_size + weights.lora_rank) * LORA_ITEMSIZE if weights.lora_rank else 0
    return gguf + lora


def vae_activation_bytes(stage: str, request: PlanRequest, itemsize: int) -> int:
    pixels = request.width * request.height
    frames = 2 if stage == REFINER_VAE else 1  # the refiner VAE decodes a frame pair
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
