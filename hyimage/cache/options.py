"""The step caches' names and options: defaults, checks that name the option, and the CLI's `KIND[:k=v,...]`."""

import argparse
import math
from typing import Any

from hyimage.errors import CacheOptionError

CACHE_OPTIONS: dict[str, dict[str, Any]] = {
    "fbcache": {"threshold": 0.05},
    "taylorseer": {"interval": 4, "order": 2, "warmup": 3},
}
"""Each kind's options with their defaults (fbcache's threshold and taylorseer's warmup are diffusers')."""


def check_cache_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of `kind`, the given ones checked and the others defaulted."""
    if kind not in CACHE_OPTIONS:
        raise CacheOptionError("cache", f"unknown cache {kind!r}; choose one of {', '.join(CACHE_OPTIONS)}")
    defaults = CACHE_OPTIONS[kind]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise CacheOptionError(
            unknown[0], f"{kind} has no option {unknown[0]!r}; its options are {', '.join(defaults)}"
        )
    checked = dict(defaults, **options)
    if kind == "fbcache":
        threshold = checked["threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise CacheOptionError("threshold", f"fbcache threshold must be a finite number, got {threshold!r}")
        if threshold < 0:
            raise CacheOptionError("threshold", f"fbcache threshold must be >= 0 (0 skips nothing), got {threshold}")
        checked["threshold"] = float(threshold)
        return checked
    for name, least in (("interval", 1), ("order", 0), ("warmup", 1)):
        value = checked[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CacheOptionError(name, f"taylorseer {name} must be an integer >= {least}, got {value!r}")
    return checked


def parse_cache_spec(text: str) -> tuple[str, dict[str, Any]]:
    """`KIND[:k=v,...]` (e.g. "taylorseer:interval=4,order=2") as (kind, checked options with defaults)."""
    kind, _, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in CACHE_OPTIONS:
        raise CacheOptionError(
            "cache", f"--cache {text!r}: unknown cache {kind!r}; write fbcache:threshold=0.08 or taylorseer:interval=4"
        )
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not name or not value:
            raise CacheOptionError(
                "cache", f"--cache {text!r}: {item!r} is not key=value, e.g. {kind}:{_example(kind)}"
            )
        if name not in CACHE_OPTIONS[kind]:
            raise CacheOptionError(
                name,
                f"--cache {text!r}: {kind} has no option {name!r}; its options are {', '.join(CACHE_OPTIONS[kind])}",
            )
        number_type = type(CACHE_OPTIONS[kind][name])
        try:
            options[name] = number_type(value)
        except ValueError:
            kind_of = "an integer" if number_type is int else "a number"
            raise CacheOptionError(name, f"--cache {text!r}: {name}={value!r} is not {kind_of}") from None
    return kind, check_cache_options(kind, options)


def _example(kind: str) -> str:
    return ",".join(f"{name}={value}" for name, value in CACHE_OPTIONS[kind].items())


def cache_spec_argument(text: str) -> tuple[str, dict[str, Any]]:
    """`parse_cache_spec` as an argparse `type` (its message shown as the argument error)."""
    try:
        return parse_cache_spec(text)
    except CacheOptionError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def describe_cache(kind: str, options: dict[str, Any]) -> str:
    """`kind:k=v,...`, the form `parse_cache_spec` reads."""
    return f"{kind}:" + ",".join(f"{name}={value}" for name, value in options.items())
