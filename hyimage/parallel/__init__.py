"""Inference on several processes with torch.distributed (launched by torchrun): classifier-free-guidance
parallelism, Ulysses sequence parallelism, and data parallelism for `hyimage batch`.

Given the DiT forward to run (`parallel_forward(..., run_dit)`) and the VAE decode (`decode_on_writer`: one rank
per image group decodes, the others receive its images), it imports no pipeline: only models and the bottom
modules."""

import argparse

from hyimage.errors import ParallelError
from hyimage.parallel.state import ParallelConfig, ParallelState

__all__ = ["ParallelConfig", "ParallelError", "ParallelState", "add_parallel_argument"]


def _parse(text: str) -> ParallelConfig:
    try:
        return ParallelConfig.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def add_parallel_argument(parser: argparse.ArgumentParser, data_parallel: bool = False) -> None:
    """The `--parallel cfg=C,sp=S` option of `generate` and `batch`."""
    rest = " (the rest of the world is data parallelism)" if data_parallel else " (torchrun starts C x S processes)"
    parser.add_argument("--parallel", type=_parse, default=None, metavar="cfg=C,sp=S",
                        help="under torchrun: C ranks for the two guidance branches x S ranks splitting the image "
                             "tokens" + rest)
