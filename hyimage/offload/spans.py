"""Tensors that lie one after another in one storage, copied as one span so their copies do too.

A DiT block's q|k|v (q|k|v|mlp) weights are consecutive rows of one tensor (`hyimage.models.dit.fused`), and its
projections run as one matmul only while they stay so. Copying each tensor on its own (`Tensor.to`) gives each a
storage of its own; copying their span once and viewing it keeps them consecutive, for the same bytes moved and one
copy instead of three or four. This module knows no model: any tensors that share a storage this way are kept so.
"""

from collections.abc import Callable, Sequence

import torch


def runs(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of `tensors` in runs: each run's tensors are contiguous and consecutive, in this order, in one storage
    (same dtype and device); every other tensor is a run of its own. Runs are in order of their first index."""
    by_storage: dict[tuple, list[int]] = {}
    alone: list[list[int]] = []
    for i, tensor in enumerate(tensors):
        if tensor.numel() and tensor.is_contiguous() and not tensor.is_meta:
            key = (id(tensor.untyped_storage()), tensor.dtype, tensor.device)  # one Python object per storage
            by_storage.setdefault(key, []).append(i)
        else:
            alone.append([i])
    found = list(alone)
    for indices in by_storage.values():
        indices.sort(key=lambda i: tensors[i].storage_offset())
        run = indices[:1]
        for i in indices[1:]:
            last = tensors[run[-1]]
            if tensors[i].storage_offset() == last.storage_offset() + last.numel():
                run.append(i)
            else:
                found.append(run)
                run = [i]
        found.append(run)
    return sorted(found, key=min)


def copied(tensors: Sequence[torch.Tensor], copy: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """`[copy(t) for t in tensors]`, except that each run of two or more (`runs`) is copied as one span and its
    tensors come back as views of that copy, consecutive as before."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for run in runs(tensors):
        if len(run) == 1:
            out[run[0]] = copy(tensors[run[0]])
            continue
        first, last = tensors[run[0]], tensors[run[-1]]
        start = first.storage_offset()
        span = copy(first.as_strided((last.storage_offset() + last.numel() - start,), (1,), start))
        for i in run:
            offset = tensors[i].storage_offset() - start
            out[i] = span[offset : offset + tensors[i].numel()].view(tensors[i].shape)
    return out
