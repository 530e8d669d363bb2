"""The two VAEs: HunyuanVAE2D (32x, images) and AutoencoderKLConv3D (the refiner's causal 16x/4x VAE).

`layers` holds what both build from, `base` what both share (slicing, tiling, loading through
`hyimage.loading.vae_loader`), `exact_tiling` the exact low-memory decode.
"""
