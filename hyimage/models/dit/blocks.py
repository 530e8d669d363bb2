"""Transformer blocks: the text token refiner, the double-stream and the single-stream blocks."""

from typing import Any

import torch
import torch.nn as nn

from hyimage.models.attention import AttentionMask, attention
from hyimage.models.dit.fused import PackedProjections, project
from hyimage.models.dit.layers import (
    MLP,
    ModulateDiT,
    TextProjection,
    TimestepEmbedder,
    activation,
    apply_rope,
    gate,
    modulate,
    qk_norm_layer,
)

Rope = tuple[torch.Tensor, torch.Tensor]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, L, H, D)."""
    return x.unflatten(-1, (heads, -1))


class IndividualTokenRefinerBlock(nn.Module):
    """Self-attention + SiLU MLP over the text tokens, gated by the pooled text/timestep vector."""

    def __init__(self, dim: int, heads_num: int, mlp_width_ratio: float = 4.0, **factory: Any) -> None:
        super().__init__()
        self.heads_num = heads_num
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-6, **factory)
        self.self_attn_qkv = nn.Linear(dim, 3 * dim, bias=True, **factory)
        self.self_attn_q_norm = nn.Identity()
        self.self_attn_k_norm = nn.Identity()
        self.self_attn_proj = nn.Linear(dim, dim, bias=True, **factory)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-6, **factory)
        self.mlp = MLP(dim, int(dim * mlp_width_ratio), act="silu", **factory)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True, **factory))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=1)
        qkv = self.self_attn_qkv(self.norm1(x)).unflatten(-1, (3, self.heads_num, -1))
        q, k, v = qkv.unbind(dim=2)
        q = self.self_attn_q_norm(q).to(v)
        k = self.self_attn_k_norm(k).to(v)
        attn = attention(q, k, v, mask).flatten(2)
        x = x + gate(self.self_attn_proj(attn), gate_msa)
        return x + gate(self.mlp(self.norm2(x)), gate_mlp)


def refiner_attention_mask(text_mask: torch.Tensor | None) -> AttentionMask:
    """The token refiner's key mask: the text mask with the first token always valid, as in the official code
    (no empty softmax rows)."""
    if text_mask is None:
        return AttentionMask(None)
    text_mask = text_mask.bool().clone()
    text_mask[:, 0] = True
    return AttentionMask.from_key_mask(text_mask)


class IndividualTokenRefiner(nn.Module):
    """A stack of refiner blocks sharing one key mask."""

    def __init__(self, dim: int, heads_num: int, depth: int, **factory: Any) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([IndividualTokenRefinerBlock(dim, heads_num, **factory) for _ in range(depth)])

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c, mask)
        return x


class SingleTokenRefiner(nn.Module):
    """`txt_in`: projects the MLLM states and refines them, conditioned on timestep + masked mean of the text."""

    def __init__(self, in_dim: int, dim: int, heads_num: int, depth: int = 2, **factory: Any) -> None:
        super().__init__()
        self.input_embedder = nn.Linear(in_dim, dim, bias=True, **factory)
        self.t_embedder = TimestepEmbedder(dim, **factory)
        self.c_embedder = TextProjection(in_dim, dim, **factory)
        self.individual_token_refiner = IndividualTokenRefiner(dim, heads_num, depth, **factory)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_mask: torch.Tensor | None,
        attn_mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """`attn_mask`: `refiner_attention_mask(text_mask)`, when the caller has it already."""
        if attn_mask is None:
            attn_mask = refiner_attention_mask(text_mask)
        if text_mask is None:
            pooled = x.mean(dim=1)
        else:
            weights = text_mask.to(x.dtype).unsqueeze(-1)
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1)
        c = self.t_embedder(t) + self.c_embedder(pooled)
        return self.individual_token_refiner(self.input_embedder(x), c, attn_mask)


class MMDoubleStreamBlock(PackedProjections):
    """Image and text keep separate weights and modulation, and attend jointly (image tokens first).

    Each stream's q, k and v projections run as one matmul (see `fused`)."""

    projection_groups = (("img_attn_q", "img_attn_k", "img_attn_v"), ("txt_attn_q", "txt_attn_k", "txt_attn_v"))

    def __init__(
        self,
        dim: int,
        heads_num: int,
        mlp_width_ratio: float,
        mlp_act_type: str = "gelu_tanh",
        qk_norm: bool = True,
        qk_norm_type: str = "rms",
        qkv_bias: bool = False,
        **factory: Any,
    ) -> None:
        super().__init__()
        self.heads_num = heads_num
        head_dim = dim // heads_num
        mlp_dim = int(dim * mlp_width_ratio)
        self.img_mod = ModulateDiT(dim, factor=6, **factory)
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **factory)
        self.img_attn_q = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.img_attn_k = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.img_attn_v = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.img_attn_q_norm = qk_norm_layer(qk_norm, qk_norm_type, head_dim, **factory)
        self.img_attn_k_norm = qk_norm_layer(qk_norm, qk_norm_type, head_dim, **factory)
        self.img_attn_proj = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **factory)
        self.img_mlp = MLP(dim, mlp_dim, act=mlp_act_type, **factory)

        self.txt_mod = ModulateDiT(dim, factor=6, **factory)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **factory)
        self.txt_attn_q = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.txt_attn_k = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.txt_attn_v = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.txt_attn_q_norm = qk_norm_layer(qk_norm, qk_norm_type, head_dim, **factory)
        self.txt_attn_k_norm = qk_norm_layer(qk_norm, qk_norm_type, head_dim, **factory)
        self.txt_attn_proj = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **factory)
        self.txt_mlp = MLP(dim, mlp_dim, act=mlp_act_type, **factory)
        self.pack_projections()

    def _qkv(
        self, x: torch.Tensor, group: int, norms: tuple[nn.Module, nn.Module], rope: Rope | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One stream's q (normed, rotated for the image), k (likewise) and v."""
        q, k, v = (split_heads(out, self.heads_num) for out in project(x, self.group(group)))
        q, k = norms[0](q).to(v), norms[1](k).to(v)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def _joint_qkv(
        self, img: torch.Tensor, txt: torch.Tensor, img_mod: tuple, txt_mod: tuple, rope: Rope
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v over [image tokens, text tokens]; each stream's own tensors are freed on return."""
        img_norms = (self.img_attn_q_norm, self.img_attn_k_norm)
        txt_norms = (self.txt_attn_q_norm, self.txt_attn_k_norm)
        img_qkv = self._qkv(modulate(self.img_norm1(img), *img_mod), 0, img_norms, rope)
        txt_qkv = self._qkv(modulate(self.txt_norm1(txt), *txt_mod), 1, txt_norms, None)
        return tuple(torch.cat(pair, dim=1) for pair in zip(img_qkv, txt_qkv))

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, rope: Rope, mask: AttentionMask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec).chunk(6, dim=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec).chunk(6, dim=-1)

        qkv = self._joint_qkv(img, txt, (img_shift1, img_scale1), (txt_shift1, txt_scale1), rope)
        attn = attention(*qkv, mask).flatten(2)
        del qkv  # freed before the output projections and MLPs
        img = img + gate(self.img_attn_proj(attn[:, : img.shape[1]]), img_gate1)
        txt = txt + gate(self.txt_attn_proj(attn[:, img.shape[1] :]), txt_gate1)
        del attn  # freed before the MLPs
        img = img + gate(self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2)), img_gate2)
        txt = txt + gate(self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2)), txt_gate2)
        return img, txt


class ConcatLinear(nn.Module):
    """`linear2` of the single-stream block: one linear layer (`fc`) over [attention output, MLP activation]."""

    def __init__(self, in_dim: int, out_dim: int, **factory: Any) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim, bias=True, **factory)

    def forward(self, attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([attn, mlp], dim=2))


class MMSingleStreamBlock(PackedProjections):
    """One stream over [image tokens, text tokens]: parallel attention and MLP, one output projection.

    `linear1`'s q, k, v and mlp parts run as one matmul (see `fused`)."""

    projection_groups = (("linear1_q", "linear1_k", "linear1_v", "linear1_mlp"),)

    def __init__(
        self,
        dim: int,
        heads_num: int,
        mlp_width_ratio: float = 4.0,
        mlp_act_type: str = "gelu_tanh",
        qk_norm: bool = True,
        qk_norm_type: str = "rms",
        **factory: Any,
    ) -> None:
        super().__init__()
        self.heads_num = heads_num
        head_dim = dim // heads_num
        mlp_dim = int(dim * mlp_width_ratio)
        self.linear1_q = nn.Linear(dim, dim, **factory)
        self.linear1_k = nn.Linear(dim, dim, **factory)
        self.linear1_v = nn.Linear(dim, dim, **factory)
        self.linear1_mlp = nn.Linear(dim, mlp_dim, **factory)
        self.linear2 = ConcatLinear(dim + mlp_dim, dim, **factory)
        self.q_norm = qk_norm_layer(qk_norm, qk_norm_type, head_dim, **factory)
        self.k_norm = qk_norm_layer(qk_norm, qk_norm_type, head_dim, **factory)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **factory)
        self.mlp_act = activation(mlp_act_type)
        self.modulation = ModulateDiT(dim, factor=3, **factory)
        self.pack_projections()

    def forward(
        self, x: torch.Tensor, vec: torch.Tensor, img_len: int, rope: Rope, mask: AttentionMask
    ) -> torch.Tensor:
        shift, scale, gate_values = self.modulation(vec).chunk(3, dim=-1)
        q, k, v, mlp = project(modulate(self.pre_norm(x), shift, scale), self.group(0))
        q, k, v = (split_heads(t, self.heads_num) for t in (q, k, v))
        q = self.q_norm(q).to(v)
        k = self.k_norm(k).to(v)
        q = torch.cat([apply_rope(q[:, :img_len], *rope), q[:, img_len:]], dim=1)
        k = torch.cat([apply_rope(k[:, :img_len], *rope), k[:, img_len:]], dim=1)
        attn = attention(q, k, v, mask).flatten(2)
        del q, k, v
        mlp = self.mlp_act(mlp)  # drops the last view of the projections' output: freed before linear2
        return x + gate(self.linear2(attn, mlp), gate_values)
