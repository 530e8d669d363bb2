"""Type and range checks for the model configurations, run before any module is built.

A configuration comes from a JSON file or a dict written by hand; a wrong type (a string where a number belongs,
a float where an integer belongs) or an absurd size (a depth of 10^9) is refused here, naming the key, instead of
failing deep inside torch or hanging while modules are built. The bounds are far above any released model.
"""

import math
from collections.abc import Sequence
from typing import Any


def _kind(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value: Any, low: int, high: int) -> None:
    """`value` is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {_kind(value)}")


def check_number(name: str, value: Any, low: float, high: float, optional: bool = False) -> None:
    """`value` is a finite int or float in (low, high] (or None when `optional`)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' or null' if optional else ''}, got {_kind(value)}")
    if not low < value <= high:
        raise ValueError(f"{name} must be in ({low}, {high}], got {value}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_kind(value)}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {_kind(value)}")


def check_int_list(name: str, value: Any, low: int, high: int, lengths: range) -> None:
    """`value` is a list or tuple of `len(value) in lengths` ints in [low, high]."""
    if not isinstance(value, list | tuple) or len(value) not in lengths:
        raise ValueError(
            f"{name} must be a list of {lengths.start} to {lengths.stop - 1} integers, got {_kind(value)}"
        )
    for index, item in enumerate(value):
        check_int(f"{name}[{index}]", item, low, high)
