"""The one attention entry point: flash-attn 3, then flash-attn 2 on CUDA, else PyTorch SDPA.

Padded keys never reach a valid query, whichever backend runs, so padding cannot change valid outputs.
The DiT builds its `AttentionMask` once per call (see `CallConstants`): a mask without padding becomes None,
so SDPA on CUDA may pick its flash or cuDNN kernels, and a padded batch takes the memory-efficient kernel
(which accepts a boolean key mask), never the math one; flash-attn's unpadding indices are computed on first
use and kept with the mask, so no step after the first reads them back from the device.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def _find_flash_varlen() -> Callable | None:
    try:
        from flash_attn_interface import flash_attn_varlen_func  # deferred: optional (flash-attn 3)

        return flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func  # deferred: optional extra hyimage[flash]

        return flash_attn_varlen_func
    except ImportError:
        return None


FLASH_VARLEN = _find_flash_varlen()
FLASH_DTYPES = (torch.float16, torch.bfloat16)
# A plain module global, not a ContextVar: torch.compile reads a global as a guarded constant, while
# ContextVar.get breaks the graph (the one process runs one pipeline at a time).
_override: Callable | None = None


@contextmanager
def attention_override(function: Callable | None) -> Iterator[None]:
    """Inside the context, `attention(q, k, v, mask)` calls `function(q, k, v, mask)` instead (None: the kernels
    below). Sequence parallelism (`hyimage.parallel.ulysses`) routes the DiT blocks' attention through it."""
    global _override
    previous, _override = _override, function
    try:
        yield
    finally:
        _override = previous


@dataclass
class AttentionMask:
    """A boolean key mask (B, L), True = valid token, built once per forward and shared by all blocks.

    `key_mask` is None when every token is valid. Flash-attn's unpadding indices are computed on first use.
    """

    key_mask: torch.Tensor | None
    _varlen: tuple[torch.Tensor, torch.Tensor, int] | None = field(default=None, repr=False)

    @classmethod
    def from_key_mask(cls, key_mask: torch.Tensor | None) -> "AttentionMask":
        if key_mask is None:
            return cls(None)
        key_mask = key_mask.bool()
        return cls(None if bool(key_mask.all()) else key_mask)

    def rows(self, samples: torch.Tensor) -> "AttentionMask":
        """The mask of the batch rows `samples` (a 1-D index tensor)."""
        return AttentionMask(None if self.key_mask is None else self.key_mask[samples])

    def varlen(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(indices of valid tokens in the flattened batch, cu_seqlens int32, max_seqlen)."""
        if self._varlen is None:
            seqlens = self.key_mask.sum(dim=1, dtype=torch.int32)
            indices = torch.nonzero(self.key_mask.flatten(), as_tuple=False).flatten()
            cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
            self._varlen = (indices, cu_seqlens, int(seqlens.max()))
        return self._varlen


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask | torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention over (B, L, H, D) tensors with an optional key mask; returns (B, L, H, D).

    Rows of padded queries are unspecified (zeros with flash-attn); valid rows only see valid keys.
    """
    if _override is not None:
        return _override(q, k, v, mask)
    if not isinstance(mask, AttentionMask):
        mask = AttentionMask.from_key_mask(mask)
    if FLASH_VARLEN is not None and q.is_cuda and q.dtype in FLASH_DTYPES:
        return _flash_attention(q, k, v, mask)
    return _sdpa_attention(q, k, v, mask)


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    attn_mask = None if mask.key_mask is None else mask.key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    batch, seqlen, heads, head_dim = q.shape
    if mask.key_mask is None:
        cu_seqlens = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=q.device)
        out = FLASH_VARLEN(
            q.reshape(-1, heads, head_dim),
            k.reshape(-1, heads, head_dim),
            v.reshape(-1, heads, head_dim),
            cu_seqlens,
            cu_seqlens,
            seqlen,
            seqlen,
        )
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(batch, seqlen, heads, head_dim)
    indices, cu_seqlens, max_seqlen = mask.varlen()
    out_unpadded = FLASH_VARLEN(
        q.reshape(-1, heads, head_dim)[indices],
        k.reshape(-1, heads, head_dim)[indices],
        v.reshape(-1, heads, head_dim)[indices],
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
    )
    out_unpadded = out_unpadded[0] if isinstance(out_unpadded, tuple) else out_unpadded
    out = q.new_zeros(batch * seqlen, heads, head_dim)
    out[indices] = out_unpadded
    return out.reshape(batch, seqlen, heads, head_dim)
