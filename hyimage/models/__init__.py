"""The networks: the diffusion transformer and the two VAEs."""

from importlib import import_module
from typing import Any

_LAZY = {
    "HYImageDiffusionTransformer": "hyimage.models.dit.model",
    "HunyuanVAE2D": "hyimage.models.vae.vae_2d",
    "AutoencoderKLConv3D": "hyimage.models.vae.vae_3d",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hyimage.models' has no attribute {name!r}")
