"""GGUF (ggml) block-quantised weights, dequantised in torch at run time.

A `GGUFLinear` keeps its weight as the raw ggml blocks (uint8, one row of blocks per output feature)
and dequantises it into the activation dtype on the device at every forward, so memory holds the
quantised bytes only (that is also what model offload and block streaming move).

Block layouts and formulas (ggml `ggml-common.h` / `ggml-quants.c`, the GGUF specification); d, dmin
and m are float16, QK_K = 256:
- Q8_0 (32 values, 34 bytes): d, int8 q[32];                       w = d * q
- Q4_0 (32, 18): d, uint8 qs[16] (low nibbles: values 0-15, high: 16-31);  w = d * (q - 8)
- Q4_1 (32, 20): d, m, qs[16];                                     w = d * q + m
- Q5_0 (32, 22): d, uint32 qh, qs[16]; bit j of qh is bit 4 of value j;    w = d * (q - 16)
- Q5_1 (32, 24): d, m, qh, qs[16];                                 w = d * q + m
- Q2_K (256, 84): scales[16] (low nibble scale, high nibble min), qs[64], d, dmin;
  value = d * scale * q2 - dmin * min, 16 sub-blocks of 16
- Q3_K (256, 110): hmask[32], qs[64], scales[12] (16 6-bit scales, minus 32), d;
  q3 = q2 - (hmask bit set ? 0 : 4), value = d * scale * q3
- Q4_K (256, 144): d, dmin, scales[12] (8 6-bit scale/min pairs), qs[128]; value = d * sc * q4 - dmin * m
- Q5_K (256, 176): d, dmin, scales[12], qh[32], qs[128]; as Q4_K with a fifth bit from qh
- Q6_K (256, 210): ql[128], qh[64], int8 scales[16], d; value = d * scale * (q6 - 32)
F32, F16 and BF16 are plain little-endian arrays.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

QK_K = 256

# ggml type id -> (name, values per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", QK_K, 84),
    11: ("Q3_K", QK_K, 110),
    12: ("Q4_K", QK_K, 144),
    13: ("Q5_K", QK_K, 176),
    14: ("Q6_K", QK_K, 210),
    30: ("BF16", 1, 2),
}
PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def type_name(type_id: int) -> str:
    return GGML_TYPES[type_id][0] if type_id in GGML_TYPES else f"type {type_id}"


def row_bytes(type_id: int, columns: int) -> int:
    """Bytes of one row of `columns` values stored as `type_id`."""
    _, block, size = GGML_TYPES[type_id]
    if columns % block:
        raise ValueError(f"a {type_name(type_id)} row holds a multiple of {block} values, not {columns}")
    return columns // block * size


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block, as float32 (N, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _bits(values: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """(N, S, *values.shape[1:]): (values >> shift) & mask for each shift, as int16."""
    values = values.to(torch.int16)
    return torch.stack([(values >> s) & mask for s in shifts], dim=1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """(N, 16) bytes -> (N, 32): low nibbles first, then high nibbles."""
    return _bits(qs, [0, 4], 0xF).reshape(qs.shape[0], 32)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_nibbles32(b[:, 2:]).float() - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _nibbles32(b[:, 4:]).float() + _f16(b, 2)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """(N, 4) bytes of a little-endian uint32 -> (N, 32) bit j as 16."""
    bits = _bits(qh, list(range(8)), 1)  # (N, 8 bits, 4 bytes): bit i of byte k is value 8k + i
    return bits.transpose(1, 2).reshape(qh.shape[0], 32) << 4


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles32(b[:, 6:]) | _fifth_bits(b[:, 2:6])
    return _f16(b, 0) * (q.float() - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles32(b[:, 8:]) | _fifth_bits(b[:, 4:8])
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _two_bit_planes(qs: torch.Tensor) -> torch.Tensor:
    """(N, 64) bytes -> (N, 256) 2-bit values in ggml order: per half of 32 bytes, shifts 0,2,4,6 outermost."""
    halves = qs.reshape(qs.shape[0], 2, 32)
    planes = torch.stack([(halves.to(torch.int16) >> s) & 3 for s in (0, 2, 4, 6)], dim=2)  # (N, 2, 4, 32)
    return planes.reshape(qs.shape[0], QK_K)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, :16].to(torch.int16)
    q = _two_bit_planes(b[:, 16:80]).float().reshape(n, 16, 16)
    d, dmin = _f16(b, 80), _f16(b, 82)
    scale = (d * (scales & 0xF).float()).unsqueeze(-1)
    low = (dmin * (scales >> 4).float()).unsqueeze(-1)
    return (scale * q - low).reshape(n, QK_K)


def _q3_k_scales(raw: torch.Tensor) -> torch.Tensor:
    """(N, 12) bytes -> (N, 16) signed scales: low 4 bits from bytes 0-7, high 2 bits from bytes 8-11."""
    raw = raw.to(torch.int16)
    low = torch.cat([raw[:, :8] & 0xF, raw[:, :8] >> 4], dim=1)
    high = torch.stack([(raw[:, 8:12] >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(raw.shape[0], 16)
    return (low | (high << 4)) - 32


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask = b[:, :32].to(torch.int16)
    q = _two_bit_planes(b[:, 32:96])
    # bit k of hmask[l] belongs to the k-th group of 32 values (value 32k + l)
    high = torch.stack([(hmask >> k) & 1 for k in range(8)], dim=1).reshape(n, QK_K)
    q = (q - 4 * (1 - high)).float().reshape(n, 16, 16)
    scales = _q3_k_scales(b[:, 96:108]).float().unsqueeze(-1)
    return (_f16(b, 108).unsqueeze(-1) * scales * q).reshape(n, QK_K)


def _k4_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 12) bytes -> 8 six-bit scales and 8 six-bit mins (ggml get_scale_min_k4)."""
    raw = raw.to(torch.int16)
    sc = torch.cat([raw[:, 0:4] & 63, (raw[:, 8:12] & 0xF) | ((raw[:, 0:4] >> 6) << 4)], dim=1)
    mn = torch.cat([raw[:, 4:8] & 63, (raw[:, 8:12] >> 4) | ((raw[:, 4:8] >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _k4_values(qs: torch.Tensor) -> torch.Tensor:
    """(N, 128) bytes -> (N, 8, 32): per 32 bytes, the low nibbles (one sub-block) then the high ones."""
    chunks = qs.reshape(qs.shape[0], 4, 32).to(torch.int16)
    return torch.stack([chunks & 0xF, chunks >> 4], dim=2).reshape(qs.shape[0], 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    sc, mn = _k4_scales(b[:, 4:16])
    q = _k4_values(b[:, 16:144]).float()
    out = (_f16(b, 0) * sc).unsqueeze(-1) * q - (_f16(b, 2) * mn).unsqueeze(-1)
    return out.reshape(b.shape[0], QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k4_scales(b[:, 4:16])
    qh = b[:, 16:48].to(torch.int16)
    high = torch.stack([(qh >> k) & 1 for k in range(8)], dim=1)  # (N, 8 sub-blocks, 32)
    q = (_k4_values(b[:, 48:176]) | (high << 4)).float()
    out = (_f16(b, 0) * sc).unsqueeze(-1) * q - (_f16(b, 2) * mn).unsqueeze(-1)
    return out.reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 64).to(torch.int16)
    qh = b[:, 128:192].reshape(n, 2, 32).to(torch.int16)
    low = torch.stack([ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], dim=2)
    high = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)
    q = ((low | (high << 4)) - 32).float().reshape(n, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).float().unsqueeze(-1)
    return (_f16(b, 208).unsqueeze(-1) * scales * q).reshape(n, QK_K)


DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def dequantize(raw: torch.Tensor, type_id: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Values of `shape` (last dim along the blocks) from the uint8 ggml bytes `raw`, as `dtype`."""
    name, block, size = GGML_TYPES.get(type_id, (None, 0, 0))
    if name in PLAIN_TYPES:
        return raw.contiguous().view(PLAIN_TYPES[name]).reshape(shape).to(dtype)
    if name not in DEQUANTIZERS:
        raise NotImplementedError(
            f"GGUF tensor type {type_name(type_id)} is not supported; supported: "
            f"{', '.join(sorted(set(DEQUANTIZERS) | set(PLAIN_TYPES)))}"
        )
    blocks = raw.contiguous().reshape(-1, size)
    return DEQUANTIZERS[name](blocks).reshape(shape).to(dtype)


class GGUFLinear(nn.Module):
    """A linear layer whose weight stays in ggml blocks (uint8 (out, row bytes)), dequantised per forward."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        type_id: int,
        bias: bool = True,
        device: torch.device | None = None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.type_id = type_id
        weight = torch.empty(out_features, row_bytes(type_id, in_features), dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype to feed this layer when the caller has no other: the bias's (the model's load dtype)."""
        return self.bias.dtype if self.bias is not None else torch.bfloat16

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight, self.type_id, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"type={type_name(self.type_id)}, bias={self.bias is not None}"
        )
