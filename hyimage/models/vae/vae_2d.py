"""HunyuanVAE2D: the 32x image VAE of HunyuanImage-2.1 (64 latent channels, 2K image -> 64x64 latent).

Convolutional encoder/decoder with GroupNorm resnet blocks, one single-head attention block in the middle,
and down/up sampling by pixel (un)shuffling with a channel-averaging / channel-repeating shortcut.
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
from hyimage.stages import VAE_DECODE


@dataclass
class HunyuanVAE2DConfig:
    """The keys of the released `vae/vae_2_1/config.json`."""

    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    ffactor_spatial: int
    sample_size: int
    sample_tsize: int
    scaling_factor: float | None = None
    shift_factor: float | None = None
    downsample_match_channel: bool = True
    upsample_match_channel: bool = True

    def __post_init__(self) -> None:
        check_vae_config(self)


def group_norm(channels: int) -> nn.GroupNorm:
    """The VAE's normalisation: 32 groups, eps 1e-6, with affine weights."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        height, width = h.shape[-2:]
        q, k, v = (rearrange(proj(h), "b c h w -> b (h w) c") for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return h.add_(x)


class Downsample(nn.Module):
    """Halve H and W: a conv to out/4 channels, then 2x2 pixel unshuffle; shortcut averages channel groups."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if out_channels % 4 or (4 * in_channels) % out_channels:
            raise ValueError(f"Downsample {in_channels} -> {out_channels} channels: need 4*in divisible by out")
        self.conv = nn.Conv2d(in_channels, out_channels // 4, kernel_size=3, padding=1)
        self.group_size = 4 * in_channels // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = rearrange(self.conv(x), "b c (h r1) (w r2) -> b (r1 r2 c) h w", r1=2, r2=2)
        shortcut = rearrange(x, "b c (h r1) (w r2) -> b (r1 r2 c) h w", r1=2, r2=2)
        shortcut = rearrange(shortcut, "b (c g) h w -> b c g h w", g=self.group_size).mean(dim=2)
        return h + shortcut


class Upsample(nn.Module):
    """Double H and W: a conv to 4*out channels, then 2x2 pixel shuffle; shortcut repeats channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if (4 * out_channels) % in_channels:
            raise ValueError(f"Upsample {in_channels} -> {out_channels} channels: need 4*out divisible by in")
        self.conv = nn.Conv2d(in_channels, out_channels * 4, kernel_size=3, padding=1)
        self.repeats = 4 * out_channels // in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = rearrange(self.conv(x), "b (r1 r2 c) h w -> b c (h r1) (w r2)", r1=2, r2=2)
        shortcut = x.repeat_interleave(self.repeats, dim=1)
        shortcut = rearrange(shortcut, "b (r1 r2 c) h w -> b c (h r1) (w r2)", r1=2, r2=2)
        return h + shortcut


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Images to latent moments (mean and log-variance on channels), with a channel-averaging shortcut at the end."""

    def __init__(self, config: HunyuanVAE2DConfig):
        super().__init__()
        channels = config.block_out_channels
        latent = config.latent_channels
        if channels[-1] % (2 * latent):
            raise ValueError(f"block_out_channels[-1]={channels[-1]} must be a multiple of 2*latent_channels")
        self.group_size = channels[-1] // (2 * latent)
        levels = num_resample_levels(config.ffactor_spatial)
        if levels >= len(channels):
            raise ValueError(f"ffactor_spatial={config.ffactor_spatial} needs more than {len(channels)} levels")

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = channels[0]
        for i, block_out in enumerate(channels):
            level = Level(
                [ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(config.layers_per_block)]
            )
            block_in = block_out
            if i < levels:
                block_out = channels[i + 1] if config.downsample_match_channel else block_in
                level.downsample = Downsample(block_in, block_out)
                block_in = block_out
            self.down.append(level)
        self.mid = MidBlock(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * latent, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.head(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The latent-resolution end: mid block, then the output conv plus the channel-averaging shortcut."""
        h = self.mid(h)
        shortcut = rearrange(h, "b (c g) h w -> b c g h w", g=self.group_size).mean(dim=2)
        return self.conv_out(swish(self.norm_out(h))) + shortcut


class Decoder(nn.Module):
    """Latents to images, with a channel-repeating shortcut at the start."""

    def __init__(self, config: HunyuanVAE2DConfig):
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))
        latent = config.latent_channels
        if channels[0] % latent:
            raise ValueError(f"block_out_channels[-1]={channels[0]} must be a multiple of latent_channels={latent}")
        self.repeats = channels[0] // latent
        levels = num_resample_levels(config.ffactor_spatial)

        block_in = channels[0]
        self.conv_in = nn.Conv2d(latent, block_in, kernel_size=3, padding=1)
        self.mid = MidBlock(block_in)
        self.up = nn.ModuleList()
        for i, block_out in enumerate(channels):
            level = Level(
                [ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(config.layers_per_block + 1)]
            )
            block_in = block_out
            if i < levels:
                block_out = channels[i + 1] if config.upsample_match_channel else block_in
                level.upsample = Upsample(block_in, block_out)
                block_in = block_out
            self.up.append(level)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stem(z)
        for level in self.up:
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))

    def stem(self, z: torch.Tensor) -> torch.Tensor:
        """The latent-resolution start: the input conv plus the channel-repeating shortcut, then the mid block."""
        return self.mid(self.conv_in(z) + z.repeat_interleave(self.repeats, dim=1))


class HunyuanVAE2D(VAEBase):
    """The 32x image VAE. Images (B, 3, H, W) or (B, 3, 1, H, W) in [-1, 1]; latents (B, 64, H/32, W/32).

    Takes the keys of the released `config.json`; keys starting with "_" (file metadata) are ignored.
    The pipelines, not the VAE, apply `config.scaling_factor` and `config.shift_factor` (when set): the DiT sees
    `(z - shift_factor) * scaling_factor` and `decode` gets `latents / scaling_factor + shift_factor`.
    """

    memory_stage = VAE_DECODE

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        latent_channels: int,
        block_out_channels: tuple[int, ...] | list[int],
        layers_per_block: int,
        ffactor_spatial: int,
        sample_size: int,
        sample_tsize: int,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        downsample_match_channel: bool = True,
        upsample_match_channel: bool = True,
        **extra: Any,
    ):
        config = config_from_arguments(HunyuanVAE2DConfig, locals(), "HunyuanVAE2D")
        super().__init__(config, Encoder(config), Decoder(config))

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images (B, C, H, W) or (B, C, 1, H, W) -> posterior over latents of the same rank."""
        frames = self._check_rank(x, "x")
        if frames:
            x = x.squeeze(2)
        factor = self.config.ffactor_spatial
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by the VAE factor {factor}")
        moments = self._encode_moments(x)
        posterior = DiagonalGaussianDistribution(moments.unsqueeze(2) if frames else moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Latents (B, C, h, w) or (B, C, 1, h, w) -> images of the same rank, in [-1, 1] (not clamped).

        On CUDA this runs under `torch.autocast(dtype=torch.float16)` like the official pipeline; set
        `vae.cuda_decode_dtype = None` to decode in the weights' dtype instead. Elsewhere the latents are cast
        to the weights' dtype. `enable_slicing()` and `enable_exact_tiling()` lower the peak memory with the same
        numbers, `enable_tiling()` with blended tiles (the numbers change).
        """
        frames = self._check_rank(z, "z")
        if frames:
            z = z.squeeze(2)
        image = self._decode_latents(z)
        if frames:
            image = image.unsqueeze(2)
        return DecoderOutput(sample=image) if return_dict else (image,)

    @staticmethod
    def _check_rank(x: torch.Tensor, name: str) -> bool:
        """True for one-frame 5-D input, False for 4-D; anything else is an error."""
        if x.ndim == 4:
            return False
        if x.ndim == 5 and x.shape[2] == 1:
            return True
        raise ValueError(f"HunyuanVAE2D takes {name} as (B, C, H, W) or (B, C, 1, H, W), got shape {tuple(x.shape)}")
