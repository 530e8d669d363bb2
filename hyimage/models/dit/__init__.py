"""The HunyuanImage-2.1 diffusion transformer, read top to bottom: `configs` (constructor arguments, frozen),
`layers`, `blocks`, `model`. Imports models.attention, quantization-free torch code, and `loading` for
`from_single_file` only."""
