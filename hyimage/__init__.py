"""hyimage: reference inference for HunyuanImage-2.1.

The pipelines are imported on first use, so `import hyimage` stays cheap
(transformers and the models load only when asked for). The library's log is off until enabled:
`from loguru import logger; logger.enable("hyimage")` (the `hyimage` command enables it).
"""

from importlib import import_module
from typing import Any

from loguru import logger

__version__ = "0.1.0"

logger.disable("hyimage")

_LAZY = {
    "HunyuanImagePipeline": "hyimage.diffusion.pipelines.hunyuanimage_pipeline",
    "HunyuanImageRefinerPipeline": "hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline",
    "RequestError": "hyimage.errors",
    "NonFiniteError": "hyimage.errors",
    "ParallelConfig": "hyimage.parallel",
}

__all__ = [
    "HunyuanImagePipeline",
    "HunyuanImageRefinerPipeline",
    "NonFiniteError",
    "ParallelConfig",
    "RequestError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hyimage' has no attribute {name!r}")
