"""The stages of a call, in the order it runs them: the memory plan's unit, and how a part names its stage."""

REPROMPT = "reprompt"
TEXT_ENCODER = "text_encoder"
GLYPH_ENCODER = "glyph_encoder"
DIT = "dit"
VAE_DECODE = "vae_decode"
REFINER_DIT = "refiner_dit"
REFINER_VAE = "refiner_vae"

STAGES = (REPROMPT, TEXT_ENCODER, GLYPH_ENCODER, DIT, VAE_DECODE, REFINER_DIT, REFINER_VAE)
CORE_STAGES = (TEXT_ENCODER, GLYPH_ENCODER, DIT, VAE_DECODE)
"""The stages every call runs (the others run when the call asks for a refiner or a reprompt)."""
