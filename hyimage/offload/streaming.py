"""Block-level streaming: run a model whose repeated blocks do not all fit on the GPU.

The model's large `nn.ModuleList`s of identical blocks (the DiT's `double_blocks` and
`single_blocks`, a language model's decoder `layers`) are split in two: the first blocks,
as many as the weight budget allows, stay on the GPU while the model runs; the others live
in pinned host memory (one buffer per block, `hyimage.offload.pinned`) and are copied in one
at a time. While block i computes, block i+1 is copied on a side CUDA stream, so the copy
hides behind the compute. Everything that is not in a block list (embeddings, final layers)
is moved to the GPU for the whole run.

On a device without CUDA the copies are no-ops, but the hooks, the plan and the
prefetch order run exactly as they do on a GPU.
"""

from collections import Counter
from dataclasses import dataclass, field

import torch
from loguru import logger
from torch import nn

from hyimage.offload.pinned import pack
from hyimage.offload.spans import copied

BLOCK_LIST_NAMES = ("double_blocks", "single_blocks", "layers", "blocks")
"""Attribute names of transformer block lists: the DiT's, and a language model's decoder `layers`.
A VAE's level lists (`down`, `up`) are not streamed: its activations, not its weights, fill the GPU."""

MIN_LIST_SHARE = 0.1
"""A block list is streamed only when it holds at least this share of the largest such list's bytes."""


def find_block_lists(module: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost transformer block lists of `module` (two or more same-type blocks) worth streaming."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, child in module.named_modules():
        if not isinstance(child, nn.ModuleList) or len(child) < 2 or name.rpartition(".")[2] not in BLOCK_LIST_NAMES:
            continue
        if len({type(block) for block in child}) != 1:
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, child))
    largest = max((_nbytes(blocks) for _, blocks in found), default=0)
    return [(name, blocks) for name, blocks in found if _nbytes(blocks) >= MIN_LIST_SHARE * largest]


def _nbytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def resident_count(rest_bytes: int, sizes: list[int], budget_bytes: int) -> int:
    """How many leading blocks stay on the device: all if everything fits, else what fits next to two buffers."""
    if rest_bytes + sum(sizes) <= budget_bytes:
        return len(sizes)
    free = budget_bytes - rest_bytes - 2 * max(sizes, default=0)
    count = 0
    while count < len(sizes) and sizes[count] <= free:
        free -= sizes[count]
        count += 1
    return count


@dataclass
class _Slot:
    """One tensor of a module: where it is attached and its copy in host memory."""

    owner: nn.Module
    name: str
    is_parameter: bool
    host: torch.Tensor

    def key(self) -> torch.Tensor:
        """The object registered in the owner: the Parameter itself (shared by every module that shares it), or
        the buffer. Unlike `param.data`, a new temporary on every access whose id may be reused, it identifies
        the tensor while it is held."""
        return self.owner._parameters[self.name] if self.is_parameter else self.owner._buffers[self.name]

    def current(self) -> torch.Tensor:
        """The tensor attached now."""
        return self.owner._parameters[self.name].data if self.is_parameter else self.owner._buffers[self.name]

    def attach(self, tensor: torch.Tensor) -> None:
        if self.is_parameter:
            self.owner._parameters[self.name].data = tensor
        else:
            self.owner._buffers[self.name] = tensor


def _slots(module: nn.Module, skip: set[int] = frozenset()) -> list[_Slot]:
    """Every parameter and buffer of `module`, leaving out the submodules whose id is in `skip`."""
    slots = []

    def visit(m: nn.Module) -> None:
        if id(m) in skip:
            return
        for name, p in m._parameters.items():
            if p is not None:
                slots.append(_Slot(m, name, True, p.data))
        for name, b in m._buffers.items():
            if b is not None:
                slots.append(_Slot(m, name, False, b))
        for child in m.children():
            visit(child)

    visit(module)
    return slots


def _move(slots: list[_Slot], device: torch.device) -> None:
    """Attach a copy on `device` of each slot's current tensor; shared tensors stay shared, and tensors consecutive
    in one storage stay consecutive (`hyimage.offload.spans`)."""
    unique: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(key) -> (key, kept alive so ids stay unique; now)
    for slot in slots:
        unique.setdefault(id(slot.key()), (slot.key(), slot.current()))
    copies = copied([now for _, now in unique.values()], lambda t: t.to(device, non_blocking=True))
    moved = dict(zip(unique, copies))
    for slot in slots:
        slot.attach(moved[id(slot.key())])


class DeviceCopy:
    """Runs a whole module on the device from a copy, keeping its host tensors for the way back.

    Entering copies every parameter and buffer to the device; leaving points the module back at the
    host tensors it had, so nothing is copied back (inference does not change weights) and host
    memory is never reallocated. Tensors not in host memory on entry are moved there first.
    """

    def __init__(self, module: nn.Module, device: torch.device, offload_device: torch.device) -> None:
        self.module = module
        self.device = device
        self.offload_device = offload_device
        self._slots: list[_Slot] = []

    def attach(self) -> None:
        self._slots = _slots(self.module)
        _move(self._slots, self.offload_device)
        for slot in self._slots:
            slot.host = slot.current()
        _move(self._slots, self.device)

    def detach(self) -> None:
        for slot in self._slots:
            slot.attach(slot.host)
        self._slots = []


@dataclass
class _StreamedBlock:
    """A block that lives in host memory and visits the GPU while it runs."""

    index: int
    module: nn.Module
    slots: list[_Slot]
    on_device: list[torch.Tensor] | None = None
    ready: "torch.cuda.Event | None" = None

    def refresh(self) -> None:
        """Take the tensors attached now (in host memory) as this block's host copies."""
        for slot in self.slots:
            slot.host = slot.current()

    def pin(self) -> None:
        """Move the block's host tensors into one pinned buffer of their size (`hyimage.offload.pinned`), unless
        they are all pinned already; tensors shared within the block stay shared."""
        if all(slot.host.is_pinned() for slot in self.slots):
            return
        unique: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # as in `_move`: keyed by the held Parameter
        for slot in self.slots:
            unique.setdefault(id(slot.key()), (slot.key(), slot.host))
        _, views = pack([host for _, host in unique.values()], pin=True)
        packed = {key: view for key, view in zip(unique, views)}
        for slot in self.slots:
            slot.host = packed[id(slot.key())]
            slot.attach(slot.host)

    def copy_in(self, device: torch.device, stream: "torch.cuda.Stream | None") -> None:
        """Start copying this block's tensors to `device` (on `stream` when given); consecutive ones as one span."""
        hosts = [s.host for s in self.slots]
        if stream is None:
            self.on_device = copied(hosts, lambda t: t.to(device))
            return
        with torch.cuda.stream(stream):
            self.on_device = copied(hosts, lambda t: t.to(device, non_blocking=True))
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def activate(self) -> None:
        """Point the block at its device copy once the copy has landed."""
        if self.ready is not None:
            current = torch.cuda.current_stream()
            current.wait_event(self.ready)
            for tensor in self.on_device:
                tensor.record_stream(current)
            self.ready = None
        for slot, tensor in zip(self.slots, self.on_device):
            slot.attach(tensor)

    def release(self) -> None:
        """Point the block back at host memory; the device copy is freed."""
        for slot in self.slots:
            slot.attach(slot.host)
        self.on_device = None
        self.ready = None


@dataclass
class StreamPlan:
    """Which blocks stay on the GPU and which are streamed, with their sizes in bytes."""

    resident: list[str] = field(default_factory=list)
    streamed: list[str] = field(default_factory=list)
    rest_bytes: int = 0
    resident_bytes: int = 0
    buffer_bytes: int = 0

    @property
    def device_bytes(self) -> int:
        """Weights on the device while the model runs: the rest, resident blocks, two stream buffers."""
        return self.rest_bytes + self.resident_bytes + self.buffer_bytes


class BlockStreamer:
    """Runs `module` on `device` with its blocks streamed from pinned host memory.

    `budget_bytes` bounds the weights kept on the device (activations come on top);
    None streams every block, keeping the least on the device.
    """

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        budget_bytes: int | None = None,
        offload_device: torch.device = torch.device("cpu"),
    ) -> None:
        self.module = module
        self.device = device
        self.offload_device = offload_device
        self.counts: Counter[str] = Counter()
        self._hooks: list = []
        self._stream: torch.cuda.Stream | None = None
        self._first_run: int | None = None

        lists = find_block_lists(module)
        named_blocks = [(f"{name}.{i}", block) for name, blocks in lists for i, block in enumerate(blocks)]
        block_ids = {id(block) for _, block in named_blocks}
        self._rest = _slots(module, skip=block_ids)
        self.plan = StreamPlan(rest_bytes=sum(s.host.numel() * s.host.element_size() for s in self._rest))

        sizes = [_nbytes(block) for _, block in named_blocks]
        resident = 0 if budget_bytes is None else resident_count(self.plan.rest_bytes, sizes, budget_bytes)
        self._resident: list[_Slot] = []
        self._streamed: list[_StreamedBlock] = []
        for i, ((name, block), size) in enumerate(zip(named_blocks, sizes)):
            if i < resident:
                self._resident.extend(_slots(block))
                self.plan.resident.append(name)
                self.plan.resident_bytes += size
            else:
                self._streamed.append(_StreamedBlock(len(self._streamed), block, _slots(block)))
                self.plan.streamed.append(name)
        self.plan.buffer_bytes = 2 * max(sizes[resident:], default=0)

    def attach(self) -> None:
        """Copy the rest and the resident blocks to the device and install the streaming hooks."""
        if self.device.type == "cuda" and self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        fixed = self._rest + self._resident
        _move(fixed, self.offload_device)
        for slot in fixed:
            slot.host = slot.current()
        _move(fixed, self.device)
        for block in self._streamed:
            block.refresh()
            if self._stream is not None:
                block.pin()
            self._hooks.append(block.module.register_forward_pre_hook(self._before(block)))
            self._hooks.append(block.module.register_forward_hook(self._after(block)))
        if self._streamed:
            self._prefetch(self._streamed[0])
        logger.debug(
            "streaming {}: {} blocks resident, {} streamed, {:.2f} GB of weights on {}",
            type(self.module).__name__,
            len(self.plan.resident),
            len(self.plan.streamed),
            self.plan.device_bytes / 1e9,
            self.device,
        )

    def detach(self) -> None:
        """Remove the hooks and point every tensor back at its host copy (nothing is copied back)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for block in self._streamed:
            block.release()
        for slot in self._rest + self._resident:
            slot.attach(slot.host)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def _prefetch(self, block: _StreamedBlock) -> None:
        if block.on_device is None:
            block.copy_in(self.device, self._stream)
            self.counts["prefetch"] += 1

    def _before(self, block: _StreamedBlock):
        def hook(module: nn.Module, args: tuple) -> None:
            if self._first_run is None:
                self._first_run = block.index
            if block.on_device is None:
                block.copy_in(self.device, self._stream)
                self.counts["late_copy"] += 1
            block.activate()
            self.counts["load"] += 1
            following = block.index + 1 if block.index + 1 < len(self._streamed) else self._first_run
            self._prefetch(self._streamed[following])

        return hook

    def _after(self, block: _StreamedBlock):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            block.release()
            self.counts["release"] += 1

        return hook
