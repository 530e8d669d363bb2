"""Building blocks of the diffusion transformer; attribute names follow the official state dict.

`**factory` is the `device`/`dtype` pair every parameterised layer is created with.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn


def activation(name: str) -> nn.Module:
    """The official activation names: gelu, gelu_tanh, relu, silu."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}; choose gelu, gelu_tanh, relu or silu")


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, scaled by a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6, **factory: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def qk_norm_layer(enabled: bool, kind: str, head_dim: int, **factory: Any) -> nn.Module:
    """The per-head query/key normalisation (RMSNorm or LayerNorm with weights), or Identity."""
    if not enabled:
        return nn.Identity()
    if kind == "rms":
        return RMSNorm(head_dim, eps=1e-6, **factory)
    return nn.LayerNorm(head_dim, elementwise_affine=True, eps=1e-6, **factory)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, C) modulation broadcast over the tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gate(x: torch.Tensor, gate_values: torch.Tensor) -> torch.Tensor:
    """Scale the (B, L, C) residual branch by a (B, C) gate."""
    return x * gate_values.unsqueeze(1)


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, dim: int, hidden_dim: int, act: str, **factory: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True, **factory)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ModulateDiT(nn.Module):
    """SiLU then a linear layer producing `factor` modulation vectors of width `dim`."""

    def __init__(self, dim: int, factor: int, **factory: Any) -> None:
        super().__init__()
        self.act = nn.SiLU()
        self.linear = nn.Linear(dim, factor * dim, bias=True, **factory)

    def forward(self, vec: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act(vec))


class TextProjection(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim: int, dim: int, **factory: Any) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=True, **factory)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim, bias=True, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


def timestep_frequencies(dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """The (dim // 2,) float32 frequencies of `timestep_embedding`, computed on the CPU as the official code does."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, freqs: torch.Tensor | None = None
) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (B,) float timesteps, in float32 (`freqs`: precomputed on t's device)."""
    if freqs is None:
        freqs = timestep_frequencies(dim, max_period).to(t.device)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def compute_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in: its weight's, or the `compute_dtype` a quantised layer declares
    (its weight is stored as ggml bytes or float8, which are not the dtype to compute in)."""
    return getattr(linear, "compute_dtype", linear.weight.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar per sample, then an MLP (mlp.0, SiLU, mlp.2).

    The frequency table is copied to a device once and kept (no host-to-device copy per step).
    """

    def __init__(self, dim: int, frequency_dim: int = 256, **factory: Any) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, dim, bias=True, **factory),
            nn.SiLU(),
            nn.Linear(dim, dim, bias=True, **factory),
        )
        self._freqs: dict[torch.device, torch.Tensor] = {}

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = self._freqs.get(t.device)
        if freqs is None:
            freqs = self._freqs[t.device] = timestep_frequencies(self.frequency_dim).to(t.device)
        return self.mlp(timestep_embedding(t, self.frequency_dim, freqs=freqs).to(compute_dtype(self.mlp[0])))


class PatchEmbed(nn.Module):
    """Non-overlapping 2D (B, C, H, W) or 3D (B, C, T, H, W) patches to (B, tokens, dim)."""

    def __init__(self, patch_size: Sequence[int], in_channels: int, dim: int, **factory: Any) -> None:
        super().__init__()
        conv = nn.Conv2d if len(patch_size) == 2 else nn.Conv3d
        self.proj = conv(in_channels, dim, kernel_size=tuple(patch_size), stride=tuple(patch_size), **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ByT5Mapper(nn.Module):
    """Projects ByT5 glyph features (1472) into the transformer width: LayerNorm, 3 linears, exact GELU."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, out_dim1: int, **factory: Any) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim, **factory)
        self.fc1 = nn.Linear(in_dim, hidden_dim, **factory)
        self.fc2 = nn.Linear(hidden_dim, out_dim, **factory)
        self.fc3 = nn.Linear(out_dim, out_dim1, **factory)
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_fn(self.fc1(self.layernorm(x)))
        return self.fc3(self.act_fn(self.fc2(x)))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on a plain LayerNorm, then the projection to patch pixels."""

    def __init__(self, dim: int, patch_size: Sequence[int], out_channels: int, **factory: Any) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **factory)
        self.linear = nn.Linear(dim, math.prod(patch_size) * out_channels, bias=True, **factory)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True, **factory))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift=shift, scale=scale))


def rope_frequencies(
    rope_dim_list: Sequence[int],
    sizes: Sequence[int],
    theta: float,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (tokens, head_dim) for an n-D grid of `sizes`, one band of `rope_dim_list` per axis.

    Tokens run over the grid in row-major order; within a band, pair i (dims 2i, 2i+1) rotates with
    frequency theta ** (-2i / band) times the token's position on that axis.
    """
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in sizes]
    grid = torch.meshgrid(*axes, indexing="ij")
    cos, sin = [], []
    for dim, positions in zip(rope_dim_list, grid):
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device)[: dim // 2] / dim
        angles = torch.outer(positions.reshape(-1), 1.0 / (theta**exponents))
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, L, H, D) by the (L, D) angles, in float32.

    x * cos + rotated * sin with the products and the sum rounded as that expression rounds them, written into
    the temporaries it makes anyway: three float32 copies of x live at most, not five."""
    x_float = x.float()
    real, imag = x_float.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = x_float * cos
    out += rotated.mul_(sin)
    return out.type_as(x)
