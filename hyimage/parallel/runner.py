"""The DiT forward of a denoising loop on a `ParallelState`: classifier-free guidance split over the cfg group,
sequence parallelism over the sp group.

With cfg=2 the loop's batch [unconditional; conditional] is cut in two: cfg rank 0 runs the unconditional
half, cfg rank 1 the conditional half, and an all-gather puts the two predictions back together, so every rank
applies the same guidance (CFG, APG and the per-sample switch between them) to the same numbers.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from hyimage.parallel.state import ParallelConfig, ParallelState
from hyimage.parallel.ulysses import SequenceParallel


def parallel_state(parallel: ParallelConfig | ParallelState | None) -> ParallelState | None:
    """A pipeline's `parallel` argument as a ParallelState (a ParallelConfig joins torchrun's process group)."""
    if parallel is None or isinstance(parallel, ParallelState):
        return parallel
    if isinstance(parallel, ParallelConfig):
        return ParallelState.create(parallel)
    raise TypeError(f"`parallel` must be a hyimage.ParallelConfig (e.g. ParallelConfig(cfg=2, sp=2)), got {parallel!r}")


def prepare_parallel(
    parallel: ParallelConfig | ParallelState | None, models: dict[str, tuple[int, bool]], device_type: str | None
) -> ParallelState | None:
    """Check `parallel` against the models ({name: (attention heads, uses CFG)}) and torchrun's launch, then join
    the process group; everything is refused here, before any model loads."""
    if parallel is None:
        return None
    if not isinstance(parallel, (ParallelConfig, ParallelState)):
        return parallel_state(parallel)
    config = parallel if isinstance(parallel, ParallelConfig) else parallel.config
    for name, (heads, has_cfg) in models.items():
        config.check_model(heads, has_cfg, name)
    if isinstance(parallel, ParallelState):
        return parallel
    return ParallelState.create(config, exact=True, device_type=device_type)


@contextmanager
def parallel_forward(
    state: ParallelState | None, dit: torch.nn.Module, batch_halves: bool, run_dit: Callable[..., torch.Tensor]
) -> Iterator[Callable]:
    """Yield the function to call instead of `run_dit`, the pipeline's one DiT forward (same arguments, same result
    on every rank).

    `batch_halves`: the batch is [unconditional; conditional] (classifier-free guidance), so the cfg group can
    split it; otherwise the cfg ranks compute the same thing.
    """
    if state is None:
        yield run_dit
        return
    with SequenceParallel(dit, state.sp_group) if state.sp_group is not None else nullcontext():
        if state.cfg_group is not None and batch_halves:
            yield partial(_cfg_forward, state, run_dit)
        else:
            yield run_dit


def _cfg_forward(
    state: ParallelState, run_dit: Callable[..., torch.Tensor], dit: torch.nn.Module, compute_dtype: Any, *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """This cfg rank's share of the batch through the DiT; the shares of all cfg ranks, gathered in order."""
    n = args[0].shape[0]
    size = state.config.cfg
    share = slice(state.cfg_rank * n // size, (state.cfg_rank + 1) * n // size)

    def mine(value: Any) -> Any:
        return value[share] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n else value

    pred = run_dit(dit, compute_dtype, *map(mine, args), **{k: mine(v) for k, v in kwargs.items()}).contiguous()
    parts = [torch.empty_like(pred) for _ in range(size)]
    dist.all_gather(parts, pred, group=state.cfg_group)
    return torch.cat(parts)
