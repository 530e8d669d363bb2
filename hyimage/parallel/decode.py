"""The VAE decode of a parallel run on one rank: the image group's writer decodes, the other ranks receive its images.

Every rank of an image's group (cfg x sp ranks) holds the same final latents, so decoding them on each rank
would only repeat the work and hold a VAE (and its activations, the largest of a 2K run) on every GPU. The
writer (cfg rank 0, sp rank 0: the rank that writes outputs) decodes and broadcasts the decoded images over
the image group, so every rank returns the same result, and the other ranks never build the VAE. The images
are still needed there when the refiner follows: its sequence-parallel collectives run on every rank.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from hyimage.errors import ParallelError
from hyimage.parallel.state import ParallelState


def decode_on_writer(
    state: ParallelState | None, decode: Callable[..., torch.Tensor], *args: Any, device: torch.device | str
) -> torch.Tensor:
    """`decode(*args)` run on the writer of this rank's image group and broadcast to its other ranks (placed on
    `device`); run here when there is no group (one process, or a group of one rank)."""
    if state is None or state.image_group is None:
        return decode(*args)
    writer = state.dp_rank * state.config.size  # the group's first global rank: cfg rank 0, sp rank 0
    if state.is_writer:
        try:
            images = decode(*args).contiguous()
        except Exception:
            dist.broadcast_object_list([None], src=writer, group=state.image_group)  # the others stop waiting
            raise
        dist.broadcast_object_list([(tuple(images.shape), images.dtype)], src=writer, group=state.image_group)
    else:
        header: list[Any] = [None]
        dist.broadcast_object_list(header, src=writer, group=state.image_group)
        if header[0] is None:
            raise ParallelError(f"rank {writer}, which decodes this image group's images, failed; see its error")
        shape, dtype = header[0]
        images = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(images, src=writer, group=state.image_group)
    return images
