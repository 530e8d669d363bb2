"""Step caching for the denoising loops: First-Block Cache and TaylorSeer, as diffusers' hooks compute them.

`pipe.enable_cache(kind, **options)` (`CacheMixin`), `make_cache`, `parse_cache_spec` (the CLI's
`--cache KIND[:k=v,...]`) and `cache_bytes` (the memory plan's share of a cache).
"""

from hyimage.cache.base import StepCache
from hyimage.cache.fbcache import FirstBlockCache
from hyimage.cache.memory import cache_bytes
from hyimage.cache.mixin import CacheMixin, make_cache
from hyimage.cache.options import CACHE_OPTIONS, CacheOptionError, cache_spec_argument, parse_cache_spec
from hyimage.cache.taylorseer import TaylorSeerCache

__all__ = [
    "CACHE_OPTIONS",
    "CacheMixin",
    "CacheOptionError",
    "FirstBlockCache",
    "StepCache",
    "TaylorSeerCache",
    "cache_bytes",
    "cache_spec_argument",
    "make_cache",
    "parse_cache_spec",
]
