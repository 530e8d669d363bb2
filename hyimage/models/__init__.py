"""The networks: the diffusion transformer and the two VAEs (no file, device or plan logic).

May import `loading` (the models' `from_single_file` / `from_pretrained` are thin calls into it, passing the class),
quantization and the bottom modules (errors, variants, stages); nothing above. Classes load on first access, so
`import hyimage.models` stays cheap."""

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
