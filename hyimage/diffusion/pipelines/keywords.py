"""`from_pretrained`'s keywords: `torch_dtype`, the official offloading flags and the first argument, normalised
before anything is read; an unknown keyword is refused naming the method and the closest valid keyword.
"""

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hyimage.checkpoints.hub import is_repo_id
from hyimage.diffusion.request import check_device, check_dtype, check_keywords
from hyimage.errors import RequestError
from hyimage.variants import TEXT_TO_IMAGE

VARIANTS = TEXT_TO_IMAGE


OFFICIAL_OFFLOADING = (
    "enable_stage1_offloading",
    "enable_reprompt_model_offloading",
    "enable_refiner_offloading",
    "enable_text_encoder_offloading",
    "enable_full_dit_offloading",
    "enable_vae_offloading",
    "enable_byt5_offloading",
)


def normalize_keywords(method: str, loader: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`torch_dtype` and the official offloading keywords turned into the loader's own; unknown ones refused."""
    kwargs = dict(kwargs)
    valid = [p.name for p in inspect.signature(loader).parameters.values() if p.name not in ("cls", "refiner_cls")]
    check_keywords(method, kwargs, [*valid, "torch_dtype", *OFFICIAL_OFFLOADING])
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None:
        torch_dtype = check_dtype(torch_dtype, "torch_dtype")
        if kwargs.get("dtype") is not None and check_dtype(kwargs["dtype"]) != torch_dtype:
            raise RequestError(
                "torch_dtype", f"`torch_dtype`={torch_dtype} and `dtype`={kwargs['dtype']} differ; pass one"
            )
        kwargs["dtype"] = torch_dtype
    elif kwargs.get("dtype") is not None:
        kwargs["dtype"] = check_dtype(kwargs["dtype"])
    if kwargs.get("device") is not None:
        kwargs["device"] = check_device(kwargs["device"])
    flags = {name: kwargs.pop(name) for name in OFFICIAL_OFFLOADING if name in kwargs}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise RequestError(name, f"`{name}` must be True or False, got {value!r}")
    if flags:
        # every part kept on the device only when all named offloading is off; otherwise the official offloading
        mode = "none" if not any(flags.values()) else "model"
        asked = kwargs.get("memory_mode")
        if asked is not None and (asked == "none") != (mode == "none"):
            raise RequestError(
                "memory_mode", f"memory_mode={asked!r} contradicts {', '.join(f'{k}={v}' for k, v in flags.items())}; "
                "pass one of them (offloading off is memory_mode='none')"
            )
        kwargs["memory_mode"] = asked if asked is not None else mode
    return kwargs


def resolve_source(
    model_name_or_path: Any, model_name: str | None, root: Any, variants: tuple[str, ...] = VARIANTS
) -> tuple[str | None, Any]:
    """The variant and the checkpoint root from `from_pretrained`'s first argument: a variant name, a local
    `ckpts/` folder (the variant then from `model_name`, default the base model) or a Hub repo id (passed on
    to `load_pipeline`, which fetches it)."""
    if model_name_or_path is None:
        return model_name, root
    name = os.fspath(model_name_or_path) if isinstance(model_name_or_path, (str, os.PathLike)) else None
    if name is None:
        raise RequestError(
            "model_name_or_path", f"must be a variant name or a folder, got {type(model_name_or_path).__name__}"
        )
    if variants == VARIANTS and is_hub_repo_id(name):
        return name, root
    if name in variants:
        if model_name is not None and model_name != name:
            raise RequestError("model_name", f"`model_name`={model_name!r} and the first argument {name!r} differ")
        return name, root
    if Path(name).expanduser().is_dir():
        if root is not None and Path(root).resolve() != Path(name).expanduser().resolve():
            raise RequestError("model_root", f"`model_root`={root} and the folder {name} differ; pass one")
        return model_name, Path(name).expanduser()
    raise RequestError(
        "model_name_or_path",
        f"{name!r} is neither a variant ({', '.join(variants)}), an existing local ckpts/ folder nor a Hub "
        "repository id (owner/name)",
    )


def is_hub_repo_id(name: str) -> bool:
    """'owner/name' that is neither a variant name nor an existing local folder."""
    return name not in VARIANTS and is_repo_id(name) and not Path(name).exists()
