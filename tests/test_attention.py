"""The attention entry point: masked SDPA, and the flash-attn unpadding path with a stand-in kernel."""

import math

import pytest
import torch

from hyimage.models import attention as attention_module
from hyimage.models.attention import AttentionMask, attention
from tests.fixtures.numerics import TOLERANCE, max_rel_error


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: int) -> torch.Tensor:
    """Plain softmax attention of one sample (L, H, D) over its first `valid` keys."""
    scores = torch.einsum("qhd,khd->hqk", q.double(), k[:valid].double()) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v[:valid].double())


def random_qkv(batch: int = 3, length: int = 10, heads: int = 2, head_dim: int = 16) -> list[torch.Tensor]:
    return [torch.randn(batch, length, heads, head_dim) for _ in range(3)]


def lengths_mask(lengths: list[int], length: int) -> torch.Tensor:
    return torch.arange(length) < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("mask_kind", ["tensor", "AttentionMask"])
def test_sdpa_with_key_mask_matches_per_sample_reference(mask_kind: str) -> None:
    q, k, v = random_qkv()
    lengths = [10, 6, 1]
    key_mask = lengths_mask(lengths, 10)
    mask = key_mask if mask_kind == "tensor" else AttentionMask.from_key_mask(key_mask)
    out = attention(q, k, v, mask)
    assert out.shape == q.shape
    for i, valid in enumerate(lengths):
        assert max_rel_error(out[i], reference_attention(q[i], k[i], v[i], valid)) <= TOLERANCE


def test_no_mask_and_all_valid_mask_are_plain_attention() -> None:
    q, k, v = random_qkv(batch=2)
    assert AttentionMask.from_key_mask(torch.ones(2, 10)).key_mask is None
    for mask in (None, torch.ones(2, 10, dtype=torch.bool)):
        out = attention(q, k, v, mask)
        for i in range(2):
            assert max_rel_error(out[i], reference_attention(q[i], k[i], v[i], 10)) <= TOLERANCE


def test_padded_keys_never_reach_valid_queries() -> None:
    q, k, v = random_qkv(batch=1)
    mask = lengths_mask([7], 10)
    k2, v2 = k.clone(), v.clone()
    k2[:, 7:] = 100 * torch.randn_like(k2[:, 7:])
    v2[:, 7:] = 100 * torch.randn_like(v2[:, 7:])
    assert torch.equal(attention(q, k, v, mask)[:, :7], attention(q, k2, v2, mask)[:, :7])


def fake_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Flash-attn's varlen contract on packed (tokens, H, D) tensors, computed segment by segment."""
    out = torch.full_like(q, float("nan"))
    bounds = cu_seqlens_q.tolist()
    assert bounds == cu_seqlens_k.tolist() and max(b - a for a, b in zip(bounds, bounds[1:])) == max_seqlen_q
    for start, end in zip(bounds, bounds[1:]):
        segment = [t[start:end].transpose(0, 1) for t in (q, k, v)]
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(*segment).transpose(0, 1)
    return out


def test_flash_path_unpads_and_repads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_module, "FLASH_VARLEN", fake_flash_varlen)
    q, k, v = random_qkv()
    lengths = [10, 4, 7]
    out = attention_module._flash_attention(q, k, v, AttentionMask.from_key_mask(lengths_mask(lengths, 10)))
    for i, valid in enumerate(lengths):
        assert max_rel_error(out[i, :valid], reference_attention(q[i], k[i], v[i], valid)[:valid]) <= TOLERANCE
        assert torch.all(out[i, valid:] == 0)
    unmasked = attention_module._flash_attention(q, k, v, AttentionMask.from_key_mask(None))
    assert max_rel_error(unmasked[1], reference_attention(q[1], k[1], v[1], 10)) <= TOLERANCE


def test_cpu_and_float32_never_take_flash(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("flash-attn must not run on CPU tensors")

    monkeypatch.setattr(attention_module, "FLASH_VARLEN", fail)
    q, k, v = random_qkv()
    attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), lengths_mask([3, 4, 5], 10))
