"""How much host RAM this machine can give the process: the default host budget (`host_budget_gb="auto"`).

Room = the smaller of the kernel's `MemAvailable` (/proc/meminfo: free memory plus the page cache and slab it can
reclaim without swapping) and, in a container, what its memory cgroup still allows: for each cgroup from the
process's own up to the root, its limit less its working set (usage less inactive file cache, which the kernel
reclaims before it kills anything; the measure kubelet and `docker stats` use), cgroup v2 (`memory.max`,
`memory.current`) or v1 (`memory.limit_in_bytes`, `memory.usage_in_bytes`). Without /proc (not Linux) the room is
the physical memory `sysconf` reports available, else all of it.

Budget = room + what the process holds now, at most the process's own share the plan counts (`process_gib`: the
plan counts the process in its budget, so a fresh process's RSS is given back to it, but not gigabytes held
by something else in a notebook) - margin. The margin (`HOST_MARGIN_GIB` + `HOST_MARGIN_SHARE` of the room) holds
what the plan does not see:
- a large tensor's transient second copy while a part is built (cast or quantised): the text encoder's token
  embedding is 1.04 GiB in bf16, the largest single tensor of any part;
- the plan's error on the host side: on the scaled CPU tree (benchmarks/bench_host_plan.py, parts of 3.9 GiB in
  all) the measured peak RSS per stage exceeded the prediction by 0.58-0.91 GiB with the auto budget (nothing
  released: heap kept by the allocator between calls, the CPU run's activations) and by 0.25-0.51 GiB with a 2 GiB
  budget (releases, each followed by `malloc_trim`): about the fixed part of the margin;
- other processes growing while a call runs (minutes): a share of the room, not a fixed amount, as they scale with
  the machine.
"""

import math
import os
from pathlib import Path

from hyimage.errors import RequestError

GIB = 1024**3

HOST_MARGIN_GIB = 1.0
"""The fixed part of the margin: the largest tensor's transient copy (1.04 GiB) and the plan's measured error (up to
0.91 GiB), see the module docstring."""

HOST_MARGIN_SHARE = 0.05
"""The share of the room kept back: other processes' growth while a call runs, and the plan's error where it grows
with the parts."""

UNLIMITED = 1 << 60
"""cgroup v1 reports "no limit" as a page-rounded 2**63 - 1; anything above this is no limit."""


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    """A `memory.stat` field (0 when absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def meminfo_available(proc: Path = Path("/proc")) -> int | None:
    """`MemAvailable` in bytes, None when /proc/meminfo does not say."""
    try:
        lines = (proc / "meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            value, _, unit = line.split(":", 1)[1].strip().partition(" ")
            return int(value) * (1024 if unit.strip().lower() == "kb" else 1)
    return None


def _own_cgroups(proc: Path) -> dict[str, str]:
    """The process's cgroup path per hierarchy ("" for v2, "memory" for v1's memory controller)."""
    paths = {}
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            paths[""] = path
        elif "memory" in controllers.split(","):
            paths["memory"] = path
    return paths


def _levels(mount: Path, path: str) -> list[Path]:
    """The process's cgroup directory under `mount` and its ancestors up to `mount`; just `mount` when the path is
    not visible there (a container sees its own cgroup as the root)."""
    parts = [p for p in path.split("/") if p]
    levels = [mount.joinpath(*parts[:k]) for k in range(len(parts), 0, -1)]
    return [level for level in levels if level.is_dir()] + [mount]


def cgroup_room(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The bytes the process's memory cgroups still allow (the tightest level), None without a limit."""
    paths = _own_cgroups(proc)
    rooms = []
    if "" in paths:
        for mount in (cgroup, cgroup / "unified"):
            if not (mount / "cgroup.controllers").is_file():
                continue
            for level in _levels(mount, paths[""]):
                limit, usage = _read_int(level / "memory.max"), _read_int(level / "memory.current")
                if limit is not None and usage is not None:
                    rooms.append(limit - (usage - _stat(level / "memory.stat", "inactive_file")))
    if "memory" in paths:
        mount = cgroup / "memory"
        for level in _levels(mount, paths["memory"]):
            limit, usage = _read_int(level / "memory.limit_in_bytes"), _read_int(level / "memory.usage_in_bytes")
            hierarchical = _stat(level / "memory.stat", "hierarchical_memory_limit") or UNLIMITED
            limit = min(limit if limit is not None else UNLIMITED, hierarchical)
            if limit < UNLIMITED and usage is not None:
                inactive = _stat(level / "memory.stat", "total_inactive_file")
                rooms.append(limit - (usage - inactive))
    return max(0, min(rooms)) if rooms else None


def _sysconf_available() -> int | None:
    """Physical memory available (else all of it) as `sysconf` reports it; None where it does not."""
    for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return os.sysconf(name) * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            continue
    return None


def host_room(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of host RAM the process can still take (see the module docstring); None when nothing says."""
    available = meminfo_available(proc)
    if available is None:
        available = _sysconf_available()
    limits = [room for room in (available, cgroup_room(proc, cgroup)) if room is not None]
    return min(limits) if limits else None


def process_rss(proc: Path = Path("/proc")) -> int:
    """The resident memory of this process in bytes (0 where /proc does not say)."""
    try:
        return int((proc / "self" / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def budget_from_room(room: int, rss: int, process_gib: float) -> float:
    """The host budget (GiB) for `room` bytes free and a process holding `rss` bytes, of which the plan counts up to
    `process_gib` as the process itself."""
    held = min(rss, int(process_gib * GIB))
    return max(0.0, (room + held) / GIB - HOST_MARGIN_GIB - HOST_MARGIN_SHARE * room / GIB)


def auto_host_budget_gib(process_gib: float) -> float:
    """What this machine can give now, in GiB rounded down to 0.1 (`host_budget_gb="auto"`); inf when nothing says
    how much."""
    room = host_room()
    if room is None:
        return math.inf
    return math.floor(10 * budget_from_room(room, process_rss(), process_gib)) / 10


def check_host_budget(value: object, name: str = "host_budget_gb") -> float | str | None:
    """`value` as a host budget: "auto", None (no limit, as `float("inf")`), inf or a finite number > 0; anything
    else refused naming `name`."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(name, f"{name} must be \"auto\" (what the machine can give), a number of GiB or "
                                 f"float('inf') (no limit), got {value!r}")
    if math.isnan(value) or value <= 0:
        raise RequestError(name, f"{name} must be a positive number of GiB, \"auto\" or inf (no limit), got {value}")
    return float(value)
