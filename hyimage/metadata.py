"""PNG text metadata: an A1111-style `parameters` chunk that image viewers and sharing sites read, plus the
full settings as JSON under `hyimage`. No chunk is named `prompt`: ComfyUI reads a `prompt` chunk as a workflow."""

import json
from typing import Any

from hyimage import __version__

METADATA_KEY = "hyimage"
PARAMETERS_KEY = "parameters"


def a1111_parameters(settings: dict[str, Any]) -> str:
    """`prompt`, then `Negative prompt: ...` when there is one, then one line of `Key: value` pairs."""
    lines = [settings.get("prompt") or ""]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = {
        "Steps": settings.get("steps"),
        "Sampler": "Euler (flow matching)",
        "CFG scale": settings.get("guidance_scale"),
        "Seed": settings.get("seed"),
        "Size": f"{settings['width']}x{settings['height']}" if settings.get("width") else None,
        "Model": settings.get("model"),
        "Shift": settings.get("shift"),
        "Refiner steps": settings.get("refiner_steps"),
        "Cache": cache_field(settings.get("cache")),
        "Version": f"hyimage {__version__}",
    }
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def cache_field(stats: dict[str, Any] | None) -> str | None:
    """A step cache's run (`pipe.cache_stats`) as `fbcache:threshold=0.08 (31/50 full steps)`."""
    if not stats:
        return None
    return f"{stats['cache']} ({stats['full_steps']}/{stats['steps']} full steps)"


def png_text(settings: dict[str, Any]) -> dict[str, str]:
    """The text chunks for `settings`: `parameters` (A1111) and `hyimage` (JSON, with the package version)."""
    full = dict(settings, version=__version__)
    return {PARAMETERS_KEY: a1111_parameters(full), METADATA_KEY: json.dumps(full, ensure_ascii=False)}
