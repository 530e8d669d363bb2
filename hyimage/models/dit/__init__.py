"""The HunyuanImage-2.1 diffusion transformer, read top to bottom: `configs` (constructor arguments, frozen),
`layers`, `fused` (a block's q|k|v(|mlp) projections as one matmul over the split layers), `blocks`, `model`.
Imports models.attention, quantization.fp8 (for `fused`), and `loading` for `from_single_file` only."""
