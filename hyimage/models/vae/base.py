"""What both VAEs share: batch slicing, blended and exact tiled decoding, the CUDA decode precision and loading."""

import contextlib
import dataclasses
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from loguru import logger
from torch import nn

from hyimage.loading.vae_loader import load_vae
from hyimage.models.config_checks import check_bool, check_int, check_int_list, check_number
from hyimage.models.vae import exact_tiling
from hyimage.models.vae.exact_tiling import ExactTiling

ConfigT = TypeVar("ConfigT")


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length); the last tile ends exactly at `length`."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _blend_ramp(size: int, before: int, after: int) -> torch.Tensor:
    """Per-pixel weights of one tile along one axis: linear ramps over the parts shared with its neighbours."""
    weight = torch.ones(size)
    if before > 0:
        weight[:before] = (torch.arange(before) + 0.5) / before
    if after > 0:
        weight[size - after :] = torch.minimum(weight[size - after :], (torch.arange(after, 0, -1) - 0.5) / after)
    return weight


def _overlaps(starts: list[int], tile: int, length: int, factor: int) -> list[tuple[int, int]]:
    """For each tile, how many output pixels it shares with the previous and with the next tile."""
    result = []
    for index, start in enumerate(starts):
        end = min(start + tile, length)
        before = (min(starts[index - 1] + tile, length) - start) * factor if index > 0 else 0
        after = (end - starts[index + 1]) * factor if index + 1 < len(starts) else 0
        result.append((max(before, 0), max(after, 0)))
    return result


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int, factor: int
) -> torch.Tensor:
    """Decode `z` (spatial axes last) in overlapping tiles of `tile` latent pixels, blending the overlaps linearly.

    Each output pixel is the weighted mean of the tiles that cover it; weights ramp from 0 to 1 across each
    overlap, so neighbouring tiles fade into each other instead of meeting at a hard seam.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile size {tile}), got {overlap}")
    height, width = z.shape[-2:]
    rows, cols = tile_starts(height, tile, tile - overlap), tile_starts(width, tile, tile - overlap)
    row_overlaps = _overlaps(rows, tile, height, factor)
    col_overlaps = _overlaps(cols, tile, width, factor)
    out = weight_sum = None
    out_dtype = z.dtype
    for row, (top, bottom) in zip(rows, row_overlaps):
        for col, (left, right) in zip(cols, col_overlaps):
            decoded = decode(z[..., row : row + tile, col : col + tile])
            if out is None:
                out_dtype = decoded.dtype
                out = decoded.new_zeros(*decoded.shape[:-2], height * factor, width * factor, dtype=torch.float32)
                weight_sum = torch.zeros(height * factor, width * factor, device=decoded.device)
            tile_h, tile_w = decoded.shape[-2:]
            weight = torch.outer(_blend_ramp(tile_h, top, bottom), _blend_ramp(tile_w, left, right))
            weight = weight.to(decoded.device)
            rows_px = slice(row * factor, row * factor + tile_h)
            cols_px = slice(col * factor, col * factor + tile_w)
            out[..., rows_px, cols_px] += decoded.float() * weight
            weight_sum[rows_px, cols_px] += weight
            del decoded
    return (out / weight_sum).to(out_dtype)


def config_from_arguments(config_class: type[ConfigT], arguments: dict[str, Any], owner: str) -> ConfigT:
    """Build a VAE config dataclass from its constructor's `locals()`, warning about unknown keys in `extra`.

    Keys starting with "_" (file metadata in the released `config.json`) are ignored silently.
    """
    unknown = sorted(key for key in arguments.get("extra", {}) if not key.startswith("_"))
    if unknown:
        logger.warning("{} ignores unknown config keys {}", owner, unknown)
    values = {field.name: arguments[field.name] for field in dataclasses.fields(config_class)}
    return config_class(**values)


def check_vae_config(config: Any) -> None:
    """Types and ranges of a VAE config dataclass (bounds far above the released VAEs); names the key on failure."""
    for name in ("in_channels", "out_channels"):
        check_int(name, getattr(config, name), 1, 64)
    check_int("latent_channels", config.latent_channels, 1, 4096)
    check_int_list("block_out_channels", config.block_out_channels, 1, 8192, range(1, 17))
    check_int("layers_per_block", config.layers_per_block, 1, 32)
    check_int("ffactor_spatial", config.ffactor_spatial, 1, 1024)
    if hasattr(config, "ffactor_temporal"):
        check_int("ffactor_temporal", config.ffactor_temporal, 1, 64)
    check_int("sample_size", config.sample_size, 1, 65536)
    check_int("sample_tsize", config.sample_tsize, 1, 4096)
    check_number("scaling_factor", config.scaling_factor, 0, 1e6, optional=True)
    check_number("shift_factor", config.shift_factor, -1e6, 1e6, optional=True)
    check_bool("downsample_match_channel", config.downsample_match_channel)
    check_bool("upsample_match_channel", config.upsample_match_channel)
    config.block_out_channels = tuple(config.block_out_channels)


class VAEBase(nn.Module):
    """Slicing, tiling (blended or exact), reconstruction and loading shared by `HunyuanVAE2D` and
    `AutoencoderKLConv3D`.

    Subclasses pass their config, encoder and decoder and define `encode` and `decode`; the decoder maps latents
    whose spatial axes come last to images `config.ffactor_spatial` times larger.
    """

    def __init__(self, config: Any, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        self.use_slicing = False
        self.use_tiling = False
        self.exact_tiling: ExactTiling | None = None
        """Settings of the exact tiled decode and encode (`enable_exact_tiling`); None runs them whole."""
        self.tile_latent_size = max(1, self.config.sample_size // self.config.ffactor_spatial)
        self.tile_latent_overlap = self.tile_latent_size // 4
        # The official pipeline decodes under torch.autocast("cuda", dtype=torch.float16); None decodes in the
        # weights' own dtype instead.
        self.cuda_decode_dtype: torch.dtype | None = torch.float16

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False) -> torch.Tensor:
        """Encode then decode (reconstruction)."""
        posterior = self.encode(sample).latent_dist
        return self.decode(posterior.sample() if sample_posterior else posterior.mode()).sample

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def enable_slicing(self) -> None:
        """Encode and decode one batch element at a time (same numbers, lower peak memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_latent_size: int | None = None, tile_latent_overlap: int | None = None) -> None:
        """Decode in overlapping latent tiles blended linearly (off by default).

        Tiles do not see each other (the mid-block attention is global), so tiled decoding changes the image
        slightly; see benchmarks/bench_vae_decode.py for the measured difference from a whole decode.
        """
        self.tile_latent_size = tile_latent_size or self.tile_latent_size
        self.tile_latent_overlap = (
            tile_latent_overlap if tile_latent_overlap is not None else self.tile_latent_size // 4
        )
        if not 0 <= self.tile_latent_overlap < self.tile_latent_size:
            raise ValueError(
                f"tile_latent_overlap={self.tile_latent_overlap} must be in [0, tile_latent_size="
                f"{self.tile_latent_size})"
            )
        logger.info(
            "VAE tiled decoding on: {}x{} latent tiles, {} latent pixels of overlap; the result differs slightly "
            "from a whole decode",
            self.tile_latent_size,
            self.tile_latent_size,
            self.tile_latent_overlap,
        )
        self.use_tiling = True
        self.exact_tiling = None

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_exact_tiling(self, tile_size: int = 256, activations_device: str | torch.device | None = None) -> None:
        """Decode and encode layer by layer over tiles of `tile_size` pixels: the whole decode's numbers (up to
        float summation order) at a peak set by the tile size (see `hyimage.models.vae.exact_tiling`).

        `activations_device`: where whole intermediate activations live; None keeps them on the execution
        device, "cpu" in (pinned, on CUDA) host memory with only tiles on the device.
        """
        self.exact_tiling = ExactTiling(tile_size, activations_device)
        self.use_tiling = False

    def disable_exact_tiling(self) -> None:
        self.exact_tiling = None

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([self._encode_one(part) for part in x.split(1)])
        return self._encode_one(x)

    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact_tiling is not None:
            return exact_tiling.encode(self.encoder, x, self.exact_tiling)
        return self.encoder(x)

    def _decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        autocast = z.device.type == "cuda" and self.cuda_decode_dtype is not None
        context = torch.autocast("cuda", dtype=self.cuda_decode_dtype) if autocast else contextlib.nullcontext()
        if not autocast:
            z = z.to(self.dtype)
        with context:
            if self.use_slicing and z.shape[0] > 1:
                return torch.cat([self._decode_one(part) for part in z.split(1)])
            return self._decode_one(z)

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        if self.exact_tiling is not None:
            return exact_tiling.decode(self.decoder, z, self.exact_tiling)
        size = self.tile_latent_size
        if self.use_tiling and (z.shape[-1] > size or z.shape[-2] > size):
            return tiled_decode(self.decoder, z, size, self.tile_latent_overlap, self.config.ffactor_spatial)
        return self.decoder(z)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        verify: bool = False,
    ) -> "VAEBase":
        """Load a released `vae/vae_2_1` or `vae/vae_refiner` folder (or its diffusers conversion).

        `verify`: refuse NaN/Inf weights, naming the tensor and the file.
        """
        return load_vae(cls, directory, dtype=dtype, device=device, verify=verify)
