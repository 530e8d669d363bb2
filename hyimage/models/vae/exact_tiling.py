"""Exact low-memory VAE decoding and encoding: layer by layer over spatial tiles.

Blended tiling (`VAEBase.enable_tiling`) decodes tiles independently, which changes the image: GroupNorm needs
statistics of the whole image, a convolution its neighbours and the mid-block attention every latent pixel.
Here every layer at image resolution runs over all tiles before the next layer starts:
- a convolution (and each resampling, a convolution plus pixel (un)shuffling) sees each tile with the halo its
  kernel needs; the layer's own padding applies where the tile meets the true image border (zeros in the 2D
  VAE, replication in the 3D one, after norm and SiLU as in a whole decode), and the outputs its padding
  touched inside the image are cropped away;
- a GroupNorm first gathers per-group mean and variance over all tiles (float32 per tile, combined in
  float64), then normalises tile by tile in float32 as `F.group_norm` does; the 3D VAE's RMSNorm is per pixel
  and needs nothing global;
- the latent-resolution part (the decoder's stem and the encoder's head, with the global attention) runs whole.
At most two whole activations are live at a time (a resnet block's input and its first convolution's output;
the second convolution plus the residual is written over the input). They live on `activations_device`: the
execution device when they fit, else host memory (pinned when the execution device is CUDA), with only tiles
on the device. The ops are those of a whole decode under the same autocast, so the result equals it up to
float summation order.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hyimage.models.vae.layers import swish

TileFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExactTiling:
    """Settings of the exact tiled decode (and encode)."""

    tile_size: int = 256
    """Tile side in pixels of each layer's input (an even number of at least 8)."""
    activations_device: str | torch.device | None = None
    """Where whole activations live: None for the execution device, "cpu" for (pinned) host memory."""

    def __post_init__(self) -> None:
        if not isinstance(self.tile_size, int) or self.tile_size < 8 or self.tile_size % 2:
            raise ValueError(f"tile_size={self.tile_size!r} must be an even number of pixels, at least 8")
        if self.activations_device is not None:
            torch.device(self.activations_device)  # raises on a name torch does not know


def decode(decoder: nn.Module, z: torch.Tensor, settings: ExactTiling) -> torch.Tensor:
    """`decoder(z)` computed layer by layer over tiles; the image comes back on z's device."""
    tiles = _Tiles(settings, z.device)
    h = tiles.store(decoder.stem(z))
    for level in decoder.up:
        h = tiles.level(level, h)
    norm_out = tiles.norm(decoder.norm_out, h)
    return tiles.map(h, lambda t: decoder.conv_out(swish(norm_out(t))), halo=1, on_device=True)


def encode(encoder: nn.Module, x: torch.Tensor, settings: ExactTiling) -> torch.Tensor:
    """`encoder(x)` computed layer by layer over tiles; the moments come back on x's device."""
    tiles = _Tiles(settings, x.device)
    h = tiles.map(x, encoder.conv_in, halo=1)
    for level in encoder.down:
        h = tiles.level(level, h)
    return encoder.head(tiles.load(h))


def group_norm_with(t: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """`norm(t)` with given per-sample, per-group statistics (B, G); computed in float32 like `F.group_norm`,
    whose float32 output autocast keeps."""
    dtype = torch.float32 if torch.is_autocast_enabled(t.device.type) else t.dtype
    groups = (*mean.shape, *[1] * (t.ndim - 1))
    channels = (t.shape[1], *[1] * (t.ndim - 2))
    h = t.float().unflatten(1, (norm.num_groups, -1)) - mean.float().view(groups)
    h = h.mul_((var + norm.eps).rsqrt().float().view(groups)).flatten(1, 2)
    return h.mul_(norm.weight.float().view(channels)).add_(norm.bias.float().view(channels)).to(dtype)


def _scaled(start: int, stop: int, scale: tuple[int, int]) -> slice:
    """[start, stop) times scale[0] / scale[1] (a layer's output over its input size: whole pixels by design)."""
    return slice(start * scale[0] // scale[1], stop * scale[0] // scale[1])


class _Tiles:
    """Runs layers over the tiles of whole activations kept on the store device."""

    def __init__(self, settings: ExactTiling, device: torch.device):
        self.size = settings.tile_size
        self.device = device
        self.store_device = device if settings.activations_device is None else torch.device(settings.activations_device)
        self.pinned = self.store_device.type == "cpu" and device.type == "cuda"

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, on_device: bool = False) -> torch.Tensor:
        if on_device:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return torch.empty(shape, dtype=dtype, device=self.store_device, pin_memory=self.pinned)

    def store(self, t: torch.Tensor) -> torch.Tensor:
        """A whole activation computed on the device, moved to the store."""
        if t.device == self.store_device:
            return t
        return self.empty(tuple(t.shape), t.dtype).copy_(t)

    def load(self, t: torch.Tensor) -> torch.Tensor:
        """A (part of a) stored activation on the execution device (the same tensor when it is there).

        Only these host-to-device copies are asynchronous (from pinned memory); writes back to the host are
        not, so a host buffer is never read before its tile has landed."""
        return t.to(self.device, non_blocking=self.pinned)

    def spans(self, length: int) -> list[tuple[int, int]]:
        return [(start, min(start + self.size, length)) for start in range(0, length, self.size)]

    def cores(self, t: torch.Tensor) -> Iterator[tuple[int, int, int, int]]:
        """(top, bottom, left, right) of the tiles partitioning t's last two axes."""
        for top, bottom in self.spans(t.shape[-2]):
            for left, right in self.spans(t.shape[-1]):
                yield top, bottom, left, right

    def map(
        self,
        x: torch.Tensor,
        fn: TileFn,
        halo: int,
        residual: Callable[[torch.Tensor, tuple[int, int, int, int]], torch.Tensor] | None = None,
        into: torch.Tensor | None = None,
        on_device: bool = False,
    ) -> torch.Tensor:
        """`fn` over x, tile by tile: each tile with `halo` pixels of its neighbours, its output cropped to the
        tile (scaled as `fn` scales), then `residual(output, tile)` added. Written into `into` when its shape and
        dtype match (it may be read only at the tile being written), else into a new activation."""
        height, width = x.shape[-2:]
        out = None
        for top, bottom, left, right in self.cores(x):
            r0, r1 = max(top - halo, 0), min(bottom + halo, height)
            c0, c1 = max(left - halo, 0), min(right + halo, width)
            y = fn(self.load(x[..., r0:r1, c0:c1]))
            rows, cols = (y.shape[-2], r1 - r0), (y.shape[-1], c1 - c0)  # the layer's scale: 2 up, 1/2 down
            y = y[..., _scaled(top - r0, bottom - r0, rows), _scaled(left - c0, right - c0, cols)]
            if residual is not None:
                y = residual(y, (top, bottom, left, right))
            if out is None:
                shape = (*y.shape[:-2], _scaled(0, height, rows).stop, _scaled(0, width, cols).stop)
                same = into is not None and tuple(into.shape) == shape and into.dtype == y.dtype
                out = into if same else self.empty(shape, y.dtype, on_device)
            out[..., _scaled(top, bottom, rows), _scaled(left, right, cols)].copy_(y)
            del y
        return out

    def norm(self, norm: nn.Module, x: torch.Tensor) -> TileFn:
        """The per-tile function of `norm` on the activation x: GroupNorm with x's whole statistics; a per-pixel
        norm as it is."""
        if not isinstance(norm, nn.GroupNorm):
            return norm
        mean, var = self.group_statistics(x, norm.num_groups)
        return lambda t: group_norm_with(t, norm, mean, var)

    def group_statistics(self, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample, per-group mean and (biased) variance of x over all tiles, float64 (B, G): each tile's in
        float32, combined pairwise (Chan, Golub and LeVeque)."""
        count, mean, m2 = 0, None, None
        for top, bottom, left, right in self.cores(x):
            t = self.load(x[..., top:bottom, left:right]).float().unflatten(1, (groups, -1)).flatten(2)
            var_t, mean_t = torch.var_mean(t, dim=2, correction=0)
            n = t.shape[2]
            mean_t, m2_t = mean_t.double(), var_t.double() * n
            if mean is None:
                count, mean, m2 = n, mean_t, m2_t
                continue
            delta = mean_t - mean
            total = count + n
            mean = mean + delta * (n / total)
            m2 = m2 + m2_t + delta.square() * (count * n / total)
            count = total
        return mean, m2 / count

    def resnet(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`block(x)`: norm1 -> SiLU -> conv1 into a new activation, then norm2 -> SiLU -> conv2 plus the
        shortcut written over x."""
        norm1 = self.norm(block.norm1, x)
        h = self.map(x, lambda t: block.conv1(swish(norm1(t))), halo=1)
        norm2 = self.norm(block.norm2, h)
        shortcut = getattr(block, "nin_shortcut", None)

        def residual(y: torch.Tensor, tile: tuple[int, int, int, int]) -> torch.Tensor:
            top, bottom, left, right = tile
            s = self.load(x[..., top:bottom, left:right])
            return y.add_(s if shortcut is None else shortcut(s))

        return self.map(h, lambda t: block.conv2(swish(norm2(t))), halo=1, residual=residual, into=x)

    def level(self, level: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`level(x)`: its resnet blocks, then its resampling (halo 2 when halving, so crops stay whole pixels)."""
        for block in level.block:
            x = self.resnet(block, x)
        if hasattr(level, "upsample"):
            x = self.map(x, level.upsample, halo=1)
        if hasattr(level, "downsample"):
            x = self.map(x, level.downsample, halo=2)
        return x
