"""What a step cache holds in device memory during the denoising stage, for the memory plan."""

from typing import Any

from hyimage.cache.options import check_cache_options
from hyimage.cache.taylorseer import FACTOR_DTYPE

BASE_TOKEN_FEATURES = 64
"""Output numbers per image token of the base and distilled DiTs (64 latent channels, 1x1 patches)."""


def cache_bytes(
    kind: str | None,
    options: dict[str, Any],
    batch: int,
    image_tokens: int,
    text_tokens: int,
    hidden_size: int,
    dtype_itemsize: int,
    token_features: int = BASE_TOKEN_FEATURES,
) -> int:
    """Peak bytes a step cache adds to the DiT stage (0 for None). `batch` counts the DiT's batch (x2 under CFG),
    `text_tokens` the joint text and glyph tokens; `token_features`: the DiT's outputs per image token.

    fbcache keeps the first block's image residual and the other blocks' residual over all tokens, and makes
    two more of the latter while it updates (the first block's concatenated output and the new residual).
    taylorseer keeps order + 1 float32 copies of the DiT's output; while it updates, the new ones sit beside
    them, and a prediction takes three more (the sum, a scaled factor, the result).
    """
    if kind is None:
        return 0
    options = check_cache_options(kind, options)
    if kind == "fbcache":
        tokens = image_tokens + text_tokens
        return batch * hidden_size * dtype_itemsize * (image_tokens + 3 * tokens)
    output = batch * image_tokens * token_features
    kept = options["order"] + 1
    return output * FACTOR_DTYPE.itemsize * max(2 * kept, kept + 3)
