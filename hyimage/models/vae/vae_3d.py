"""AutoencoderKLConv3D: the refiner's causal 3D VAE (16x spatial, 4x temporal, 32 latent channels).

Like the 2D VAE but on (B, C, T, H, W) with RMS norms and convolutions that are causal in time (the past is
padded by repeating the first frame). The first frame is compressed on its own, so T = 1 + 4k frames give
1 + k latent frames; the refiner uses it on single images (T = 1).
"""

from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from hyimage.models.vae.base import VAEBase, check_vae_config, config_from_arguments
from hyimage.models.vae.distributions import AutoencoderKLOutput, DecoderOutput, DiagonalGaussianDistribution
from hyimage.models.vae.layers import Level, num_resample_levels, swish
from hyimage.stages import REFINER_VAE


@dataclass
class AutoencoderKLConv3DConfig:
    """The keys of the released `vae/vae_refiner/config.json`."""

    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    ffactor_spatial: int
    ffactor_temporal: int
    sample_size: int
    sample_tsize: int
    scaling_factor: float | None = None
    shift_factor: float | None = None
    downsample_match_channel: bool = True
    upsample_match_channel: bool = True

    def __post_init__(self) -> None:
        check_vae_config(self)


class CausalConv3d(nn.Module):
    """3x3x3 convolution padded by replication: symmetric in H and W, only towards the past in T.

    A single frame is padded with copies of itself, so its output is a 2D convolution with the kernel summed
    over time: computed that way (a third of the work and no 3-frame padded copy, which matters at 2K).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        half = kernel_size // 2
        self.padding = (half, half, half, half, kernel_size - 1, 0)  # W, H, T
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == 1:
            frame = F.pad(x[:, :, 0], self.padding[:4], mode="replicate")
            return F.conv2d(frame, self.conv.weight.sum(dim=2), self.conv.bias).unsqueeze(2)
        return self.conv(F.pad(x, self.padding, mode="replicate"))


class CausalRMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(channels) * gamma (computed in float32 for half-precision inputs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalized = F.normalize(x.float() if x.element_size() < 4 else x, dim=1).to(x.dtype)
        return normalized * self.scale * self.gamma


class CausalAttnBlock(nn.Module):
    """Single-head self-attention over all pixels of all frames; a frame sees itself and earlier frames."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = CausalRMSNorm(channels)
        self.q = nn.Conv3d(channels, channels, kernel_size=1)
        self.k = nn.Conv3d(channels, channels, kernel_size=1)
        self.v = nn.Conv3d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv3d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        frames, height, width = h.shape[-3:]
        q, k, v = (rearrange(proj(h), "b c f h w -> b (f h w) c") for proj in (self.q, self.k, self.v))
        mask = None
        if frames > 1:
            frame_of_token = torch.arange(frames, device=x.device).repeat_interleave(height * width)
            mask = frame_of_token[:, None] >= frame_of_token[None, :]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = rearrange(h, "b (f h w) c -> b c f h w", f=frames, h=height, w=width)
        return x + self.proj_out(h)


class CausalResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = CausalRMSNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = CausalRMSNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return h.add_(x)


def _space_to_channels(x: torch.Tensor, time: int) -> torch.Tensor:
    """(B, C, T*time, 2H, 2W) -> (B, time*2*2*C, T, H, W), the (time, row, col) offset outermost."""
    return rearrange(x, "b c (f r1) (h r2) (w r3) -> b (r1 r2 r3 c) f h w", r1=time, r2=2, r3=2)


def _channels_to_space(x: torch.Tensor, time: int) -> torch.Tensor:
    """Inverse of `_space_to_channels`."""
    return rearrange(x, "b (r1 r2 r3 c) f h w -> b c (f r1) (h r2) (w r3)", r1=time, r2=2, r3=2)


def _group_mean(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Average each run of channels.shape // groups consecutive channels: (B, C, ...) -> (B, groups, ...)."""
    return x.unflatten(1, (groups, -1)).mean(dim=2)


class DownsampleDCAE(nn.Module):
    """Halve H and W (and T, keeping the first frame alone) by moving pixels into channels.

    A causal conv to out/factor channels is rearranged into `out` channels; the shortcut rearranges the input
    the same way and averages channel groups. With temporal downsampling the first frame only has the 2x2
    spatial pixels, so its conv output is doubled along channels and its shortcut averages half-size groups.
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        factor = 8 if temporal else 4
        if out_channels % factor or (factor * in_channels) % out_channels:
            raise ValueError(
                f"DownsampleDCAE {in_channels} -> {out_channels} channels: need {factor}*in divisible by out"
            )
        self.temporal = temporal
        self.out_channels = out_channels
        self.conv = CausalConv3d(in_channels, out_channels // factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if not self.temporal:
            return _space_to_channels(h, 1) + _group_mean(_space_to_channels(x, 1), self.out_channels)
        first = _space_to_channels(h[:, :, :1], 1)
        h = torch.cat([torch.cat([first, first], dim=1), _space_to_channels(h[:, :, 1:], 2)], dim=2)
        shortcut_first = _group_mean(_space_to_channels(x[:, :, :1], 1), self.out_channels)
        shortcut_rest = _group_mean(_space_to_channels(x[:, :, 1:], 2), self.out_channels)
        return h + torch.cat([shortcut_first, shortcut_rest], dim=2)


class UpsampleDCAE(nn.Module):
    """Double H and W (and T after the first frame) by moving channels into pixels; shortcut repeats channels.

    With temporal upsampling the first frame only gets the 2x2 spatial pixels (the first half of its channels).
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        factor = 8 if temporal else 4
        if (factor * out_channels) % in_channels:
            raise ValueError(
                f"UpsampleDCAE {in_channels} -> {out_channels} channels: need {factor}*out divisible by in"
            )
        self.temporal = temporal
        self.repeats = factor * out_channels // in_channels
        self.conv = CausalConv3d(in_channels, out_channels * factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if not self.temporal:
            return _channels_to_space(h, 1) + _channels_to_space(x.repeat_interleave(self.repeats, dim=1), 1)
        first = _channels_to_space(h[:, :, :1], 1)
        h = torch.cat([first[:, : first.shape[1] // 2], _channels_to_space(h[:, :, 1:], 2)], dim=2)
        shortcut_first = _channels_to_space(x[:, :, :1], 1).repeat_interleave(self.repeats // 2, dim=1)
        shortcut_rest = _channels_to_space(x[:, :, 1:], 2).repeat_interleave(self.repeats, dim=1)
        return h + torch.cat([shortcut_first, shortcut_rest], dim=2)


class CausalMidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = CausalResnetBlock(channels, channels)
        self.attn_1 = CausalAttnBlock(channels)
        self.block_2 = CausalResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class CausalEncoder(nn.Module):
    """Images to latent moments (mean and log-variance on channels), with a channel-averaging shortcut at the end."""

    def __init__(self, config: AutoencoderKLConv3DConfig):
        super().__init__()
        channels = config.block_out_channels
        latent = config.latent_channels
        if channels[-1] % (2 * latent):
            raise ValueError(f"block_out_channels[-1]={channels[-1]} must be a multiple of 2*latent_channels")
        self.group_size = channels[-1] // (2 * latent)
        spatial = num_resample_levels(config.ffactor_spatial)
        spatial_only = num_resample_levels(config.ffactor_spatial // config.ffactor_temporal)
        if spatial >= len(channels):
            raise ValueError(f"ffactor_spatial={config.ffactor_spatial} needs more than {len(channels)} levels")

        self.conv_in = CausalConv3d(config.in_channels, channels[0])
        self.down = nn.ModuleList()
        block_in = channels[0]
        for i, block_out in enumerate(channels):
            level = Level(
                [CausalResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(config.layers_per_block)]
            )
            block_in = block_out
            if i < spatial:
                block_out = channels[i + 1] if config.downsample_match_channel else block_in
                level.downsample = DownsampleDCAE(block_in, block_out, temporal=i >= spatial_only)
                block_in = block_out
            self.down.append(level)
        self.mid = CausalMidBlock(block_in)
        self.norm_out = CausalRMSNorm(block_in)
        self.conv_out = CausalConv3d(block_in, 2 * latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.head(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The latent-resolution end: mid block, then the output conv plus the channel-averaging shortcut."""
        h = self.mid(h)
        shortcut = rearrange(h, "b (c g) f h w -> b c g f h w", g=self.group_size).mean(dim=2)
        return self.conv_out(swish(self.norm_out(h))) + shortcut


class CausalDecoder(nn.Module):
    """Latents to images, with a channel-repeating shortcut at the start."""

    def __init__(self, config: AutoencoderKLConv3DConfig):
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))
        latent = config.latent_channels
        if channels[0] % latent:
            raise ValueError(f"block_out_channels[-1]={channels[0]} must be a multiple of latent_channels={latent}")
        self.repeats = channels[0] // latent
        spatial = num_resample_levels(config.ffactor_spatial)
        temporal = num_resample_levels(config.ffactor_temporal)

        block_in = channels[0]
        self.conv_in = CausalConv3d(latent, block_in)
        self.mid = CausalMidBlock(block_in)
        self.up = nn.ModuleList()
        for i, block_out in enumerate(channels):
            level = Level(
                [CausalResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(config.layers_per_block + 1)]
            )
            block_in = block_out
            if i < max(spatial, temporal):
                block_out = channels[i + 1] if config.upsample_match_channel else block_in
                level.upsample = UpsampleDCAE(block_in, block_out, temporal=i < temporal)
                block_in = block_out
            self.up.append(level)
        self.norm_out = CausalRMSNorm(block_in)
        self.conv_out = CausalConv3d(block_in, config.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stem(z)
        for level in self.up:
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))

    def stem(self, z: torch.Tensor) -> torch.Tensor:
        """The latent-resolution start: the input conv plus the channel-repeating shortcut, then the mid block."""
        return self.mid(self.conv_in(z) + z.repeat_interleave(self.repeats, dim=1))


class AutoencoderKLConv3D(VAEBase):
    """The refiner's causal 3D VAE. Videos/images (B, 3, T, H, W) in [-1, 1], T = 1 + 4k; latents
    (B, 32, 1 + k, H/16, W/16).

    Takes the keys of the released `config.json`; keys starting with "_" (file metadata) are ignored.
    The pipelines, not the VAE, apply `config.scaling_factor` and `config.shift_factor` (when set): the DiT sees
    `(z - shift_factor) * scaling_factor` and `decode` gets `latents / scaling_factor + shift_factor`.
    """

    memory_stage = REFINER_VAE

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        latent_channels: int,
        block_out_channels: tuple[int, ...] | list[int],
        layers_per_block: int,
        ffactor_spatial: int,
        ffactor_temporal: int,
        sample_size: int,
        sample_tsize: int,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        downsample_match_channel: bool = True,
        upsample_match_channel: bool = True,
        **extra: Any,
    ):
        config = config_from_arguments(AutoencoderKLConv3DConfig, locals(), "AutoencoderKLConv3D")
        super().__init__(config, CausalEncoder(config), CausalDecoder(config))

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images/videos (B, C, T, H, W) -> posterior over latents (B, 2*latent split into mean/logvar)."""
        spatial, temporal = self.config.ffactor_spatial, self.config.ffactor_temporal
        if x.ndim != 5:
            raise ValueError(f"AutoencoderKLConv3D takes x as (B, C, T, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2] % spatial or x.shape[-1] % spatial or (x.shape[2] - 1) % temporal:
            raise ValueError(
                f"input of {x.shape[2]} frames of {tuple(x.shape[-2:])} pixels: frames must be 1 + a multiple of "
                f"{temporal} and sizes divisible by {spatial}"
            )
        posterior = DiagonalGaussianDistribution(self._encode_moments(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Latents (B, C, t, h, w) -> images/videos (B, C, 1 + 4(t-1), 16h, 16w) in [-1, 1] (not clamped).

        On CUDA this runs under `torch.autocast(dtype=torch.float16)` like the official pipeline; set
        `vae.cuda_decode_dtype = None` to decode in the weights' dtype instead. `enable_slicing()` and
        `enable_exact_tiling()` lower the peak memory with the same numbers, `enable_tiling()` with blended
        spatial tiles (the numbers change).
        """
        if z.ndim != 5:
            raise ValueError(f"AutoencoderKLConv3D takes z as (B, C, T, H, W), got shape {tuple(z.shape)}")
        image = self._decode_latents(z)
        return DecoderOutput(sample=image) if return_dict else (image,)
