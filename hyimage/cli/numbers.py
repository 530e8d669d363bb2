"""argparse `type=` functions for numeric options: finite and in range, refused with the flag's name (an image
side with the nearest valid one).

argparse prefixes the flag to the message (`argument --gpu-gb: must be a finite number ...`) and exits with
code 2 before anything runs. `float("nan")`, `float("inf")` and `1e999` parse as floats, so a plain
`type=float` lets them through; these refuse them.
"""

import argparse
import math
from collections.abc import Callable

from hyimage.diffusion.request import MAX_SIDE, nearest_side

MAX_GB = 1e6
"""The largest memory budget in GiB (a typo guard: an exabyte)."""


def _bounds(low: float, high: float, low_open: bool) -> str:
    lower = f"greater than {low:g}" if low_open else f"at least {low:g}"
    return lower if high == math.inf else f"{lower} and at most {high:g}"


def real(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] ((low, high] when `low_open`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {_bounds(low, high, low_open)}, got {text!r}")
        if value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"must be {_bounds(low, high, low_open)}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def integer(low: int, high: int) -> Callable[[str], int]:
    """An int in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def side(multiple: int) -> Callable[[str], int]:
    """An image width or height: a multiple of `multiple` in [multiple, MAX_SIDE]; else the nearest valid one is
    named (as `hyimage generate` does)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < multiple or value % multiple or value > MAX_SIDE:
            raise argparse.ArgumentTypeError(
                f"must be a multiple of {multiple} (the VAE's downsampling factor) between {multiple} and "
                f"{MAX_SIDE}, got {value}; the nearest valid size is {nearest_side(value, multiple)}"
            )
        return value

    parse.__name__ = "size"
    return parse


def gigabytes() -> Callable[[str], float]:
    """A memory budget in GiB: finite, above 0, at most MAX_GB."""
    return real(0.0, MAX_GB, low_open=True)
