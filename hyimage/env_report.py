"""What a bug report needs about the machine and the install (`hyimage env`, as `diffusers-cli env`).

Reads versions from the installed distributions' metadata (nothing optional is imported), the torch build and
GPUs, host RAM (as `hyimage.offload.machine` reads it: /proc/meminfo and the cgroup limit, v2 or v1), free disk at the model root, and how complete the
checkpoints are per variant: the files each needs in the official layout, and, where `hyimage download` recorded
the Hub's listing, the files missing against it (`hyimage.checkpoints.download.plan_download`, offline).
"""

import importlib.metadata
import importlib.util
import math
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from hyimage.checkpoints.download import plan_download
from hyimage.checkpoints.layout import CheckpointLayout, model_root
from hyimage.checkpoints.needs import DownloadConfig
from hyimage.offload.host_plan import HOST_BASE_GIB
from hyimage.offload.machine import auto_host_budget_gib, host_room, meminfo_available
from hyimage.variants import TEXT_TO_IMAGE

GIB = 1024**3
DISTRIBUTIONS = (
    "hyimage", "torch", "transformers", "diffusers", "safetensors", "huggingface_hub", "gguf", "fastapi", "uvicorn",
    "flash-attn", "accelerate", "numpy", "pillow",
)
EXTRAS = {"flash": ("flash_attn",), "serve": ("fastapi", "uvicorn"), "test": ("pytest", "diffusers")}
FP8_MATMUL_CAPABILITY = (8, 9)  # torch._scaled_mm runs on FP8 tensor cores from Ada (sm_89) and Hopper (sm_90)


def versions() -> dict[str, str | None]:
    """Installed version of each distribution (None: not installed), and Python's."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def torch_build() -> dict[str, Any]:
    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }


def gpus() -> list[dict[str, Any]]:
    """Name, compute capability, memory and FP8-matmul support of each visible CUDA device."""
    found = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        properties = torch.cuda.get_device_properties(index)
        capability = (properties.major, properties.minor)
        found.append({
            "index": index,
            "name": properties.name,
            "compute_capability": f"{capability[0]}.{capability[1]}",
            "memory_gib": round(properties.total_memory / GIB, 1),
            "fp8_matmul": capability >= FP8_MATMUL_CAPABILITY and hasattr(torch, "_scaled_mm"),
        })
    return found


def ram() -> dict[str, float | None]:
    """Total and available RAM, the room this process has (a container's cgroup limit included) and the host budget
    `host_budget_gb="auto"` plans with, as `hyimage.offload.machine` reads them."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    budget = auto_host_budget_gib(HOST_BASE_GIB)
    return {"total_gib": _gib(total), "available_gib": _gib(meminfo_available()), "room_gib": _gib(host_room()),
            "auto_host_budget_gib": None if math.isinf(budget) else budget}


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 1)


def extras() -> dict[str, bool]:
    """Which optional extras of hyimage are importable."""
    return {name: all(importlib.util.find_spec(module) is not None for module in modules)
            for name, modules in EXTRAS.items()}


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def checkpoints(root: Path) -> dict[str, dict[str, Any]]:
    """Per variant and precision: the needed files of the official layout that are absent, and what the download
    record (if any) says is missing."""
    layout = CheckpointLayout(root)
    shared = [layout.vae / "config.json", layout.text_encoder / "config.json", layout.byt5 / "config.json",
              layout.glyph_checkpoint, layout.dit("hunyuanimage-refiner"), layout.refiner_vae / "config.json"]
    report = {}
    for variant in TEXT_TO_IMAGE:
        for fp8 in (False, True):
            dit = [layout.dit_fp8(variant), layout.dit_fp8_scale(variant)] if fp8 else [layout.dit(variant)]
            found = plan_download(DownloadConfig(variant=variant, fp8=fp8), root, online=False)
            report[f"{variant}{' fp8' if fp8 else ''}"] = {
                "absent": [str(path.relative_to(root)) for path in dit + shared if not path.exists()],
                "download_record": (
                    "none (not fetched with `hyimage download`)" if found.unknown and not found.files
                    else f"{len(found.missing)} files missing" if found.missing else "complete"
                ),
                "download_command": found.config.command(root),
            }
    return report


def env_report(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Everything `hyimage env` prints, as one JSON-ready dict."""
    root = model_root(root)
    disk = shutil.disk_usage(_first_existing(root))
    return {
        "platform": platform.platform(),
        "executable": sys.executable,
        "versions": versions(),
        "torch": torch_build(),
        "gpus": gpus(),
        "ram": ram(),
        "extras": extras(),
        "model_root": {"path": str(root), "exists": root.is_dir(), "free_disk_gib": round(disk.free / GIB, 1)},
        "checkpoints": checkpoints(root) if root.is_dir() else {},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as indented `key: value` lines, to paste into an issue."""
    lines: list[str] = []

    def emit(value: Any, indent: int) -> None:
        for key, item in value.items():
            if isinstance(item, dict):
                lines.append(" " * indent + f"{key}:")
                emit(item, indent + 2)
            elif isinstance(item, list) and item and isinstance(item[0], dict):
                lines.append(" " * indent + f"{key}:")
                for entry in item:
                    emit(entry, indent + 2)
                    lines.append("")
            else:
                shown = ", ".join(map(str, item)) or "-" if isinstance(item, list) else "-" if item is None else item
                lines.append(" " * indent + f"{key}: {shown}")

    emit(report, 0)
    return "\n".join(lines)
