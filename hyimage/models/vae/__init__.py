"""The two VAEs: HunyuanVAE2D (32x, images) and AutoencoderKLConv3D (the refiner's causal 16x/4x VAE)."""
