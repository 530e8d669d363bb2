"""Parallel configuration and the torch.distributed process groups behind it.

Ranks are laid out as `rank = dp * (cfg * sp) + c * sp + s`: the `sp` ranks of one sequence-parallel group
are neighbours (on one node when `sp` is at most the GPUs per node, where the all-to-alls are heaviest),
the `cfg` ranks of a classifier-free-guidance group are `sp` apart, and what is left of the world is data
parallelism (used by `hyimage batch`). Everything here checks the configuration against the model and the
launcher environment before any model loads.
"""

import os
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hyimage.errors import ParallelError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ParallelConfig:
    """`cfg` ranks for the two classifier-free-guidance branches (1 or 2) times `sp` ranks of sequence parallelism."""

    cfg: int = 1
    sp: int = 1

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise ValueError(f"parallel cfg={self.cfg} is not possible: cfg is 1 or 2 (one rank per guidance branch)")
        if not isinstance(self.sp, int) or self.sp < 1:
            raise ValueError(f"parallel sp={self.sp} is not possible: sp is a positive number of ranks")

    @property
    def size(self) -> int:
        """Ranks that work on one image: cfg x sp."""
        return self.cfg * self.sp

    @classmethod
    def parse(cls, text: str) -> "ParallelConfig":
        """`cfg=2,sp=4` (either part may be left out: it is then 1)."""
        values: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in ("cfg", "sp") or not value.strip().isdigit() or key in values:
                raise ValueError(f"--parallel {text!r} is not understood; write it as cfg=C,sp=S (e.g. cfg=2,sp=4)")
            values[key] = int(value)
        if not values:
            raise ValueError(f"--parallel {text!r} is empty; write it as cfg=C,sp=S (e.g. cfg=2,sp=4)")
        return cls(**values)

    def check_model(self, heads: int, has_cfg: bool, model: str) -> None:
        """Refuse what `model` (its attention heads, whether it uses classifier-free guidance) cannot run."""
        if self.cfg == 2 and not has_cfg:
            raise ParallelError(
                f"parallel cfg=2 needs classifier-free guidance, which {model} does not use (guidance is "
                "embedded in the distilled model); use cfg=1 and put the ranks into sp"
            )
        if self.sp > heads:
            raise ParallelError(
                f"parallel sp={self.sp} is more than the {heads} attention heads of {model}: each rank needs at "
                f"least one head; use sp <= {heads} (even splits: {', '.join(map(str, divisors(heads)))})"
            )


def divisors(n: int) -> list[int]:
    """The rank counts above 1 that split `n` heads evenly."""
    return [d for d in range(2, n + 1) if n % d == 0]


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment variables are set (this process is one of its workers)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def backend_for(device_type: str) -> str:
    """The torch.distributed backend: NCCL for CUDA tensors, gloo for CPU tensors (both when CUDA is there)."""
    if not dist.is_available():
        raise ParallelError(
            "this PyTorch build has no torch.distributed; install a build with it (the official wheels have it)"
        )
    if device_type == "cuda":
        if not dist.is_nccl_available():
            raise ParallelError(
                "torch.distributed's NCCL backend is missing from this PyTorch build, and parallel inference on "
                "CUDA needs it; install the official CUDA build of PyTorch, or run on the CPU (--device cpu, gloo)"
            )
        if not dist.is_gloo_available():
            return "nccl"
        return "cpu:gloo,cuda:nccl"
    if not dist.is_gloo_available():
        raise ParallelError(
            "torch.distributed's gloo backend (needed on the CPU) is missing from this PyTorch build; "
            "install the official PyTorch build"
        )
    return "gloo"


def init_distributed(device_type: str | None = None) -> None:
    """Join the process group that torchrun describes in the environment (no-op when it is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return
    if not launched_by_torchrun():
        missing = [name for name in TORCHRUN_ENV if name not in os.environ]
        raise ParallelError(
            f"--parallel needs several processes started by torchrun (missing {', '.join(missing)} in the "
            "environment); launch with `torchrun --nproc-per-node N -m hyimage ...`, or leave out --parallel"
        )
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = backend_for(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend)


def check_launch(config: ParallelConfig, exact: bool, device_type: str | None = None) -> int:
    """Before anything loads: torchrun's environment, a world size that fits `config`, the backend; returns the
    number of data-parallel groups."""
    if dist.is_available() and dist.is_initialized():
        return check_world(config, dist.get_world_size(), exact)
    if not launched_by_torchrun():
        missing = [name for name in TORCHRUN_ENV if name not in os.environ]
        raise ParallelError(
            f"--parallel cfg={config.cfg},sp={config.sp} needs {config.size} processes started by torchrun (missing "
            f"{', '.join(missing)} in the environment); launch with `torchrun --nproc-per-node {config.size} -m "
            "hyimage ...`, or leave out --parallel"
        )
    groups = check_world(config, int(os.environ["WORLD_SIZE"]), exact)
    backend_for(device_type or ("cuda" if torch.cuda.is_available() else "cpu"))
    return groups


def check_world(config: ParallelConfig, world: int, exact: bool) -> int:
    """The number of data-parallel groups; refuses a world size that does not fit cfg x sp."""
    if exact and world != config.size:
        raise ParallelError(
            f"--parallel cfg={config.cfg},sp={config.sp} needs exactly {config.size} processes but torchrun started "
            f"{world}; launch with `torchrun --nproc-per-node {config.size} ...` (or change cfg/sp)"
        )
    if world % config.size:
        raise ParallelError(
            f"--parallel cfg={config.cfg},sp={config.sp} needs a multiple of {config.size} processes but torchrun "
            f"started {world}; use --nproc-per-node x nodes = a multiple of {config.size}"
        )
    return world // config.size


@dataclass
class ParallelState:
    """This process's place in the layout and its process groups (None where the group has one rank)."""

    config: ParallelConfig
    rank: int
    world: int
    dp_rank: int
    dp_size: int
    cfg_rank: int
    sp_rank: int
    cfg_group: Any  # torch.distributed.ProcessGroup or None (builds without distributed lack the class)
    sp_group: Any
    image_group: Any
    device: torch.device

    @property
    def is_writer(self) -> bool:
        """The one rank of a data-parallel group that writes outputs (cfg rank 0, sp rank 0)."""
        return self.cfg_rank == 0 and self.sp_rank == 0

    @classmethod
    def create(cls, config: ParallelConfig, exact: bool = True, device_type: str | None = None) -> "ParallelState":
        """Check the world size, join torchrun's process group and build the cfg and sp groups (collective)."""
        check_launch(config, exact, device_type)
        init_distributed(device_type)
        world, rank = dist.get_world_size(), dist.get_rank()
        dp_size = check_world(config, world, exact)
        size, sp = config.size, config.sp
        dp_rank, within = divmod(rank, size)
        cfg_rank, sp_rank = divmod(within, sp)
        sp_lists = [list(range(start, start + sp)) for start in range(0, world, sp)]
        cfg_lists = [
            [d * size + c * sp + s for c in range(config.cfg)] for d in range(dp_size) for s in range(sp)
        ]
        sp_group = _subgroup(sp_lists, rank) if sp > 1 else None
        cfg_group = _subgroup(cfg_lists, rank) if config.cfg > 1 else None
        image_lists = [list(range(start, start + size)) for start in range(0, world, size)]
        image_group = _subgroup(image_lists, rank) if size > 1 else None
        device = torch.device(device_type or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return cls(config, rank, world, dp_rank, dp_size, cfg_rank, sp_rank, cfg_group, sp_group, image_group, device)

    def shared_seeds(self, count: int) -> list[int]:
        """`count` random seeds drawn by the first rank of this image's group and used by all its ranks."""
        seeds = [[random.randrange(2**31) for _ in range(count)]]
        if self.image_group is not None:
            dist.broadcast_object_list(seeds, src=self.dp_rank * self.config.size, group=self.image_group)
        return seeds[0]


def shared_random_seed() -> int:
    """A random seed, the same on every rank of torchrun's world (joining its process group first)."""
    init_distributed()
    seed = [random.randrange(2**31)]
    dist.broadcast_object_list(seed, src=0)
    return seed[0]


def _subgroup(rank_lists: list[list[int]], rank: int) -> Any:
    """Create every group of `rank_lists` (all ranks must call this alike) and return the one holding `rank`."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine
