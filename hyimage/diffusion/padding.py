"""Drop the padding of text and glyph embeddings before the denoising loop.

The encoders pad every prompt to a fixed length (1000 Qwen tokens, 128 ByT5 bytes), but a padded key never
reaches a valid query and only image tokens leave the DiT, so positions after the last valid token of every
sample in the batch change nothing but the work done. Cutting them once per call (one host read of the masks)
keeps the prediction and saves that work at every step.
"""

import torch


def trimmed_length(mask: torch.Tensor) -> int:
    """One past the last position that is valid in any sample of a (B, L) mask; at least 1 (the token refiner
    always treats the first token as valid)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return max(int((mask.bool() * positions).max()), 1) if mask.numel() else 1


def trim_padding(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, C) states and their (B, L) mask cut to `trimmed_length(mask)` positions."""
    length = trimmed_length(mask)
    return states[:, :length], mask[:, :length]
