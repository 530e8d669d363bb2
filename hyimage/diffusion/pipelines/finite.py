"""Refuse to return a silently wrong image: non-finite values are caught at the end of each stage.

One `isfinite().all()` per stage output (the text encoders' embeddings, the latents after the whole
denoising loop, the decoded images): a NaN anywhere in a step propagates to the final latents, so the
loop itself needs no check and no host synchronisation per step.
"""

import torch

from hyimage.errors import NonFiniteError


def check_finite(tensor: torch.Tensor | None, stage: str, likely_cause: str) -> None:
    """Raise `NonFiniteError` naming `stage` and `likely_cause` if `tensor` holds NaN or Inf."""
    if tensor is None or not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    nans = int(torch.isnan(tensor).sum())
    raise NonFiniteError(
        stage,
        f"{stage} produced non-finite values ({nans} NaN, {tensor.numel() - nans - int(torch.isfinite(tensor).sum())} "
        f"Inf of {tensor.numel()}); nothing was saved. Likely cause: {likely_cause}",
    )
