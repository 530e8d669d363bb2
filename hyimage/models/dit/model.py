"""HYImageDiffusionTransformer: the HunyuanImage-2.1 diffusion transformer (base, distilled, refiner)."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hyimage.loading.dit_loader import load_dit
from hyimage.models.attention import AttentionMask
from hyimage.models.dit.blocks import (
    MMDoubleStreamBlock,
    MMSingleStreamBlock,
    SingleTokenRefiner,
    refiner_attention_mask,
)
from hyimage.models.dit.configs import DiTConfig, resolve_dit_config
from hyimage.models.dit.fused import pack_projections
from hyimage.models.dit.layers import (
    ByT5Mapper,
    FinalLayer,
    PatchEmbed,
    TextProjection,
    TimestepEmbedder,
    rope_frequencies,
)
from hyimage.stages import DIT, REFINER_DIT

BYT5_DIM = 1472
# The official forward's default guidance, torch.tensor([6016.0], dtype=torch.bfloat16): exact in bf16.
DEFAULT_GUIDANCE = 6016.0


class HYImageDiffusionTransformer(nn.Module):
    """Takes the official constructor arguments (see `DiTConfig`); its state dict has the official keys."""

    @property
    def memory_stage(self) -> str:
        """The memory plan's stage: the refiner's DiT has 3-D patches."""
        return REFINER_DIT if len(self.config.patch_size) == 3 else DIT

    def __init__(
        self,
        patch_size: Sequence[int] = (1, 2, 2),
        in_channels: int = 4,
        out_channels: int | None = None,
        hidden_size: int = 3072,
        heads_num: int = 24,
        mlp_width_ratio: float = 4.0,
        mlp_act_type: str = "gelu_tanh",
        mm_double_blocks_depth: int = 20,
        mm_single_blocks_depth: int = 40,
        rope_dim_list: Sequence[int] = (16, 56, 56),
        qkv_bias: bool = True,
        qk_norm: bool = True,
        qk_norm_type: str = "rms",
        guidance_embed: bool = False,
        text_projection: str = "single_refiner",
        use_attention_mask: bool = True,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        text_states_dim: int = 4096,
        rope_theta: int = 256,
        glyph_byT5_v2: bool = False,
        use_meanflow: bool = False,
    ) -> None:
        super().__init__()
        self.config = config = DiTConfig(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            hidden_size=hidden_size,
            heads_num=heads_num,
            mlp_width_ratio=mlp_width_ratio,
            mlp_act_type=mlp_act_type,
            mm_double_blocks_depth=mm_double_blocks_depth,
            mm_single_blocks_depth=mm_single_blocks_depth,
            rope_dim_list=rope_dim_list,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            qk_norm_type=qk_norm_type,
            guidance_embed=guidance_embed,
            text_projection=text_projection,
            use_attention_mask=use_attention_mask,
            text_states_dim=text_states_dim,
            rope_theta=rope_theta,
            glyph_byT5_v2=glyph_byT5_v2,
            use_meanflow=use_meanflow,
        )
        factory = {"device": device, "dtype": dtype}
        dim = config.hidden_size

        if config.glyph_byT5_v2:
            self.byt5_in = ByT5Mapper(BYT5_DIM, hidden_dim=2048, out_dim=2048, out_dim1=dim, **factory)
        self.img_in = PatchEmbed(config.patch_size, config.in_channels, dim, **factory)
        if config.text_projection == "single_refiner":
            self.txt_in = SingleTokenRefiner(config.text_states_dim, dim, config.heads_num, depth=2, **factory)
        else:
            self.txt_in = TextProjection(config.text_states_dim, dim, **factory)
        self.time_in = TimestepEmbedder(dim, **factory)
        self.time_r_in = TimestepEmbedder(dim, **factory) if config.use_meanflow else None
        self.guidance_in = TimestepEmbedder(dim, **factory) if config.guidance_embed else None

        block_args = dict(
            mlp_width_ratio=config.mlp_width_ratio,
            mlp_act_type=config.mlp_act_type,
            qk_norm=config.qk_norm,
            qk_norm_type=config.qk_norm_type,
            **factory,
        )
        self.double_blocks = nn.ModuleList(
            [
                MMDoubleStreamBlock(dim, config.heads_num, qkv_bias=config.qkv_bias, **block_args)
                for _ in range(config.mm_double_blocks_depth)
            ]
        )
        self.single_blocks = nn.ModuleList(
            [MMSingleStreamBlock(dim, config.heads_num, **block_args) for _ in range(config.mm_single_blocks_depth)]
        )
        self.final_layer = FinalLayer(dim, config.patch_size, config.out_channels, **factory)

    @classmethod
    def from_config(
        cls,
        config: str | dict | DiTConfig,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> "HYImageDiffusionTransformer":
        """Build from a variant name, a dict of constructor arguments or a DiTConfig (weights uninitialised on meta)."""
        return cls(**resolve_dit_config(config).to_dict(), dtype=dtype, device=device)

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        config: str | dict | DiTConfig,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        fp8_scale: str | Path | None = None,
        **kwargs: Any,
    ) -> "HYImageDiffusionTransformer":
        """Load a released `dit/*.safetensors` (official, diffusers or ComfyUI layout; bf16, FP8 + scale file or
        ComfyUI FP8) or a GGUF file (`.gguf`, weights kept quantised)."""
        model = load_dit(cls, path, config, dtype=dtype, device=device, fp8_scale=fp8_scale, **kwargs)
        return pack_projections(model)  # the loader gives each part a tensor of its own

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        *,
        byt5_text_states: torch.Tensor | None = None,
        byt5_text_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        timesteps_r: torch.Tensor | None = None,
        block_cache: Callable[["BlockPass", torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict the flow for latents (B, C, H, W) or (B, C, T, H, W); returns the same layout with out_channels.

        timestep, guidance (already x1000) and timesteps_r are (B,) floats; text_states (B, L, text_states_dim)
        with encoder_attention_mask (B, L); byt5_text_states (B, Lg, 1472) with byt5_text_mask (B, Lg) are
        required when the model has `byt5_in`. `block_cache(blocks, img, txt)`, when given, runs the blocks in
        place of `blocks.rest(*blocks.first(img, txt))` (a step cache from `hyimage.cache` that may skip the rest).
        """
        config = self.config
        if hidden_states.ndim != len(config.patch_size) + 2:
            raise ValueError(
                f"hidden_states must have {len(config.patch_size) + 2} dims for patch_size {config.patch_size}, "
                f"got shape {tuple(hidden_states.shape)}"
            )
        grid = tuple(size // patch for size, patch in zip(hidden_states.shape[2:], config.patch_size))
        if config.glyph_byT5_v2 and (byt5_text_states is None or byt5_text_mask is None):
            raise ValueError("this model renders glyphs (glyph_byT5_v2=True): pass byt5_text_states and byt5_text_mask")
        constants = self._call_constants(grid, encoder_attention_mask, byt5_text_mask, hidden_states.device)

        img = self.img_in(hidden_states)
        vec = self.time_in(timestep)
        if timesteps_r is not None:
            if self.time_r_in is None:
                raise ValueError("timesteps_r was given but this model has no time_r_in (use_meanflow=False)")
            vec = (vec + self.time_r_in(timesteps_r)) / 2
        if self.guidance_in is not None:
            if guidance is None:
                guidance = torch.full((img.shape[0],), DEFAULT_GUIDANCE, device=img.device)
            vec = vec + self.guidance_in(guidance)

        if config.text_projection == "single_refiner":
            txt = self.txt_in(text_states, timestep, constants.pool_mask, constants.refiner_mask)
        else:
            txt = self.txt_in(text_states)
        if config.glyph_byT5_v2:
            txt = reorder_tokens(torch.cat([self.byt5_in(byt5_text_states), txt], dim=1), constants.order)

        img_len = img.shape[1]
        blocks = BlockPass(self.double_blocks, self.single_blocks, vec, constants.rope, constants.mask, img_len)
        x = blocks.rest(*blocks.first(img, txt)) if block_cache is None else block_cache(blocks, img, txt)

        return self.unpatchify(self.final_layer(x[:, :img_len], vec), grid)

    def compile_blocks(self, dynamic: bool | None = None, backend: str = "inductor") -> "HYImageDiffusionTransformer":
        """Regional torch.compile: each double- and single-stream block's forward, as one full graph.

        All blocks of a kind share their code, so the 20 double and the 40 single blocks compile once each;
        hooks (block streaming) stay outside the graphs. `dynamic=None` lets a dimension that changes between
        calls (the text length) become dynamic, the others stay static.
        """
        for block in [*self.double_blocks, *self.single_blocks]:
            block.forward = torch.compile(block.forward, fullgraph=True, dynamic=dynamic, backend=backend)
        return self

    def _call_constants(
        self,
        grid: tuple[int, ...],
        text_mask: torch.Tensor,
        glyph_mask: torch.Tensor | None,
        device: torch.device,
    ) -> "CallConstants":
        """The RoPE table, masks and token order of this forward, reused while the same masks come back.

        A sampling loop passes the same mask tensors at every step, so what must be read back from the device
        to build them (whether a mask has padding, flash-attn's unpadding indices) is read once per call.
        """
        cached = getattr(self, "_constants", None)
        if cached is not None and cached.matches(grid, text_mask, glyph_mask, device):
            return cached
        self._constants = CallConstants.build(self.config, grid, text_mask, glyph_mask, device)
        return self._constants

    def unpatchify(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """(B, tokens, C * prod(patch)) -> (B, C, *grid * patch)."""
        patch = self.config.patch_size
        n = len(grid)
        x = x.reshape(x.shape[0], *grid, self.config.out_channels, *patch)
        # (B, g0.., C, p0..) -> (B, C, g0, p0, g1, p1, ...)
        order = [0, n + 1] + [i for axis in range(n) for i in (1 + axis, n + 2 + axis)]
        x = x.permute(*order)
        return x.reshape(x.shape[0], self.config.out_channels, *(g * p for g, p in zip(grid, patch)))


@dataclass
class BlockPass:
    """One forward's pass through the transformer blocks, split after the first block: the seam a step cache
    uses (it runs `first`, then `rest` for all samples, some or none). `img` and `txt` are (B, tokens, C)."""

    double_blocks: nn.ModuleList
    single_blocks: nn.ModuleList
    vec: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    mask: AttentionMask
    img_len: int

    def first(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first block: (img, txt) after it."""
        if len(self.double_blocks):
            return self.double_blocks[0](img, txt, self.vec, self.rope, self.mask)
        x = self.single_blocks[0](torch.cat([img, txt], dim=1), self.vec, self.img_len, self.rope, self.mask)
        return x[:, : self.img_len], x[:, self.img_len :]

    def rest(self, img: torch.Tensor, txt: torch.Tensor, samples: torch.Tensor | None = None) -> torch.Tensor:
        """The other blocks on the first block's output: [img; txt] tokens (B, tokens, C), for the rows
        `samples` (a 1-D index tensor) of the batch only when given."""
        vec, mask = self.vec, self.mask
        if samples is not None:
            img, txt, vec, mask = img[samples], txt[samples], vec[samples], mask.rows(samples)
        doubles = len(self.double_blocks)
        for block in islice(self.double_blocks, 1, None):
            img, txt = block(img, txt, vec, self.rope, mask)
        x = torch.cat([img, txt], dim=1)
        for block in islice(self.single_blocks, 0 if doubles else 1, None):
            x = block(x, vec, self.img_len, self.rope, mask)
        return x


def valid_first_order(mask: torch.Tensor) -> torch.Tensor:
    """Per sample, the token order that puts valid tokens ahead of padding, keeping the order within each group.

    With tokens = [glyph, text] this is the official order: valid glyph, valid text, padded glyph, padded text.
    """
    return torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices


def reorder_tokens(tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, C) gathered along L by a (B, L) order."""
    return torch.gather(tokens, 1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


@dataclass
class CallConstants:
    """What a forward derives from the latent grid and the masks alone: the same at every step of a call.

    It remembers the mask tensors it was built from (and their version counters, so an in-place edit of a
    mask rebuilds it).
    """

    key: tuple
    sources: tuple[torch.Tensor | None, ...]
    pool_mask: torch.Tensor | None
    refiner_mask: AttentionMask
    order: torch.Tensor | None
    mask: AttentionMask
    rope: tuple[torch.Tensor, torch.Tensor]

    @staticmethod
    def _key(grid: tuple[int, ...], sources: tuple[torch.Tensor | None, ...], device: torch.device) -> tuple:
        return grid, torch.device(device), tuple(None if s is None else (id(s), s._version) for s in sources)

    def matches(
        self, grid: tuple[int, ...], text_mask: torch.Tensor, glyph_mask: torch.Tensor | None, device: torch.device
    ) -> bool:
        sources = (text_mask, glyph_mask)
        return all(a is b for a, b in zip(sources, self.sources)) and self.key == self._key(grid, sources, device)

    @classmethod
    def build(
        cls,
        config: DiTConfig,
        grid: tuple[int, ...],
        text_mask: torch.Tensor,
        glyph_mask: torch.Tensor | None,
        device: torch.device,
    ) -> "CallConstants":
        sources = (text_mask, glyph_mask)
        text_mask = text_mask.to(device).bool()
        pool_mask = text_mask if config.use_attention_mask else None
        joint_mask, order = text_mask, None
        if config.glyph_byT5_v2:
            joint_mask = torch.cat([glyph_mask.to(device).bool(), text_mask], dim=1)
            order = valid_first_order(joint_mask)
            joint_mask = torch.gather(joint_mask, 1, order)
        img_len = math.prod(grid)
        mask = AttentionMask.from_key_mask(
            torch.cat([joint_mask.new_ones(joint_mask.shape[0], img_len), joint_mask], dim=1)
        )
        # Computed on the CPU as the official code does, copied to the device once per call.
        cos, sin = rope_frequencies(config.rope_dim_list, grid, config.rope_theta)
        return cls(
            key=cls._key(grid, sources, device),
            sources=sources,
            pool_mask=pool_mask,
            refiner_mask=refiner_attention_mask(pool_mask),
            order=order,
            mask=mask,
            rope=(cos.to(device), sin.to(device)),
        )
