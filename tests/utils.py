"""Helpers shared by the tests."""

import json
from pathlib import Path

import torch

MANIFEST_DIR = Path(__file__).resolve().parent / "data" / "manifests"  # copied from shared/manifests


def load_manifest(name: str) -> dict:
    """One of tests/data/manifests/*.json by stem, e.g. "dit_base"."""
    return json.loads((MANIFEST_DIR / f"{name}.json").read_text())


def max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference divided by the reference's largest magnitude."""
    ref = ref.double()
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


TOLERANCE = 1e-4
