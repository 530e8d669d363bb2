"""Host memory safe by default: the host budget read from the machine ("auto"), plans that cannot fit refused before
anything is read with ways out that the planner checked, and `hyimage plan` planning what `generate` runs.

Machine figures come from fake /proc and cgroup trees; plans are the planner's alone (nothing loaded)."""

import inspect
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import hyimage.cli.plan as plan_cli
import hyimage.offload.manager as manager_module
from hyimage.cli import main
from hyimage.diffusion.pipelines.loader import (
    load_pipeline,
    load_refiner_pipeline,
    make_memory,
)
from hyimage.errors import RequestError
from hyimage.models.dit.configs import resolve_dit_config
from hyimage.offload import MemoryManager, machine
from hyimage.offload.dit_weights import dit_on_meta
from hyimage.offload.planner import make_plan
from hyimage.offload.request import PlanRequest
from hyimage.offload.ways_out import ways_out
from hyimage.variants import DISTILLED, REFINER

GIB = 1024**3
FIRST_COMMAND = PlanRequest(variant=DISTILLED, fp8=True, refiner=True)  # the README's first command, 2048x2048


def _tree(tmp_path: Path, files: dict[str, str]) -> tuple[Path, Path]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "proc", tmp_path / "cgroup"


MEMINFO = "MemTotal:       33554432 kB\nMemFree:         1000000 kB\nMemAvailable:   31457280 kB\n"  # 30 GiB


def test_room_is_mem_available_without_a_cgroup_limit(tmp_path: Path) -> None:
    proc, cgroup = _tree(tmp_path, {"proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/\n",
                                    "cgroup/cgroup.controllers": "memory\n"})
    assert machine.host_room(proc, cgroup) == 30 * GIB


def test_cgroup_v2_limit_of_an_ancestor_less_its_working_set(tmp_path: Path) -> None:
    proc, cgroup = _tree(tmp_path, {
        "proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/user.slice/app\n", "cgroup/cgroup.controllers": "memory\n",
        "cgroup/user.slice/app/memory.max": "max\n", "cgroup/user.slice/app/memory.current": f"{GIB}\n",
        "cgroup/user.slice/memory.max": f"{8 * GIB}\n", "cgroup/user.slice/memory.current": f"{5 * GIB}\n",
        "cgroup/user.slice/memory.stat": f"anon {4 * GIB}\ninactive_file {GIB}\n",
    })
    assert machine.host_room(proc, cgroup) == 4 * GIB  # 8 GiB limit - (5 GiB used - 1 GiB inactive file cache)


def test_cgroup_v1_limit_seen_as_the_container_root(tmp_path: Path) -> None:
    proc, cgroup = _tree(tmp_path, {
        "proc/meminfo": MEMINFO, "proc/self/cgroup": "5:memory:/docker/abc\n1:cpu:/\n",
        "cgroup/memory/memory.limit_in_bytes": f"{6 * GIB}\n", "cgroup/memory/memory.usage_in_bytes": f"{2 * GIB}\n",
        "cgroup/memory/memory.stat": f"hierarchical_memory_limit 9223372036854771712\ntotal_inactive_file {GIB // 2}\n",
    })
    assert machine.host_room(proc, cgroup) == int(4.5 * GIB)
    (cgroup / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit
    assert machine.cgroup_room(proc, cgroup) is None and machine.host_room(proc, cgroup) == 30 * GIB


def test_without_proc_the_room_is_what_sysconf_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(machine.os, "sysconf", lambda name: pages[name])
    assert machine.host_room(tmp_path / "none", tmp_path / "none") == 1000 * 4096


def test_budget_is_the_room_and_the_process_share_less_the_margin() -> None:
    # 30 GiB free, a fresh process of 0.3 GiB: 30 + 0.3 - 1 - 5% of 30
    assert machine.budget_from_room(30 * GIB, int(0.3 * GIB), 2.0) == pytest.approx(27.8)
    # a process already holding 5 GiB gets back only the 2 GiB the plan counts for it
    assert machine.budget_from_room(30 * GIB, 5 * GIB, 2.0) == pytest.approx(29.5)


@pytest.mark.parametrize("value", [-1, 0, math.nan, "lots", True])
def test_bad_host_budgets_are_refused_naming_the_argument(value: object) -> None:
    with pytest.raises(RequestError, match="host_budget_gb") as error:
        MemoryManager("cpu", "auto", host_budget_gb=value)
    assert error.value.argument == "host_budget_gb"


def test_auto_is_read_once_for_the_device_and_inf_or_none_means_no_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    monkeypatch.setattr(manager_module, "auto_host_budget_gib", lambda process: asked.append(process) or 23.4)
    memory = MemoryManager("cuda", "auto", gpu_budget_gb=24, host_budget_gb="auto", request=FIRST_COMMAND)
    assert memory.plan.host_gib == 23.4 and memory.host_budget_gib() == 23.4 and asked == [2.0]
    assert all(s.host_gib <= 23.4 for s in memory.plan.stages)
    assert MemoryManager("cpu", "auto", host_budget_gb="auto").host_budget_gib() == 23.4 and asked[-1] == 0.25
    for unbounded in (math.inf, None):
        memory = MemoryManager("cuda", "auto", gpu_budget_gb=24, host_budget_gb=unbounded, request=FIRST_COMMAND)
        assert memory.plan.host_gib is None and memory.plan.stage("dit").host_gib > 50


def test_from_pretrained_defaults_to_the_machine_budget() -> None:
    for loader in (load_pipeline, load_refiner_pipeline):
        assert inspect.signature(loader).parameters["host_budget_gb"].default == "auto"
    assert make_memory(None, None, None).host_budget_gb == "auto"
    with pytest.raises(RequestError, match="host_budget_gb"):
        make_memory(None, None, None, -2.0)


def _way(plan, style: str = "generate") -> list[str]:
    return [way.describe(style) for way in ways_out(plan)]


def test_ways_out_are_each_planned_again_and_fit() -> None:
    plan = make_plan(PlanRequest(refiner=True), 24, 24)  # bf16 base + refiner on 24 GiB of RAM
    assert not plan.fits and "--fp8" in _way(plan)
    for way in ways_out(plan):
        options = dict(way.options)
        gpu, host = options.pop("gpu_gib", plan.gpu_gib), options.pop("host_gib", plan.host_gib)
        again = make_plan(replace(plan.request, **options), gpu, host)
        assert again.fits and all(s.host_gib <= host for s in again.stages)
        if "host_gib" in dict(way.options):  # the smallest whole GiB: one less does not fit
            assert not make_plan(replace(plan.request, **options), gpu, host - 1).fits
    assert "--no-refiner" in _way(make_plan(FIRST_COMMAND, 4, 32))  # only the refiner is refused at 4 GiB
    reprompt = _way(make_plan(PlanRequest(variant=DISTILLED, fp8=True, reprompt="32b"), 24, 32))
    assert "--reprompt 7b" in reprompt and "no --reprompt" in reprompt
    assert ways_out(make_plan(FIRST_COMMAND, 24, 32)) == []


def test_a_refused_plan_stops_before_the_first_part_is_read() -> None:
    memory = MemoryManager("cuda", "auto", gpu_budget_gb=2.5, host_budget_gb=32, request=FIRST_COMMAND)
    with pytest.raises(MemoryError, match=r"(?s)refuses the dit stage.*ways out.*gpu_budget_gb=5"):
        memory.host.before_build("text_encoder")  # what a pipeline calls before it reads the text encoder
    only_refiner = MemoryManager("cuda", "auto", gpu_budget_gb=4, host_budget_gb=32, request=FIRST_COMMAND)
    only_refiner.host.before_build("text_encoder")  # the core stages fit: a call without the refiner runs
    with pytest.raises(MemoryError, match=r"(?s)refiner_dit.*refiner=False"):
        only_refiner.host.before_build("refiner_dit")


def test_plan_command_plans_what_generate_runs(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(plan_cli, "auto_host_budget_gib", lambda process: 27.5)
    assert main(["plan", "--gpu-gb", "24", "--variant", "distilled", "--fp8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["host_gib"] == 27.5 and plan["host_budget"] == "machine" and plan["request"]["refiner"]
    assert [s["stage"] for s in plan["stages"]][-2:] == ["refiner_dit", "refiner_vae"]
    for stage in plan["stages"]:
        assert {"stage", "placement", "predicted_peak_gib", "host_gib"} <= set(stage) and stage["host_gib"] <= 27.5
    assert main(["plan", "--gpu-gb", "24", "--variant", "distilled", "--fp8"]) == 0
    assert "host RAM peak 25.7 GiB of 27.5 GiB (what this machine can give now" in capsys.readouterr().out
    assert main(["plan", "--gpu-gb", "24", "--variant", "distilled", "--fp8", "--refiner", "--json"]) == 0
    capsys.readouterr()
    assert main(["plan", "--gpu-gb", "24", "--variant", "distilled", "--fp8", "--no-refiner", "--json"]) == 0
    assert "refiner_dit" not in {s["stage"] for s in json.loads(capsys.readouterr().out)["stages"]}

    assert main(["plan", "--gpu-gb", "24", "--ram-gb", "16", "--variant", "distilled", "--fp8"]) == 1
    out = capsys.readouterr().out
    assert "refuses the dit stage" in out and "--ram-gb 22" in out and "--no-refiner + --gguf Q4_K" in out
    assert main(["plan", "--gpu-gb", "24", "--ram-gb", "inf", "--variant", "distilled", "--fp8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["host_gib"] is None


def test_plan_command_needs_a_gpu_budget_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["plan", "--variant", "distilled", "--fp8"]) == 1
    assert "--gpu-gb" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-4", "nan", "0", "many"])
def test_generate_refuses_a_bad_host_budget_naming_it(value: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "a fox", "--host-budget-gb", value])
    assert "--host-budget-gb" in capsys.readouterr().err


TABLE_GPUS = (8, 12, 24)
TABLE_HOSTS = (16, 24, 32, 64)


@pytest.mark.parametrize("gpu", TABLE_GPUS)
@pytest.mark.parametrize("host", TABLE_HOSTS)
def test_first_command_default_plan_fits_the_host_it_is_given(gpu: int, host: int) -> None:
    """The README table: every cell that is not refused stays within its host, every stage holding at least its own
    part (its bytes counted here from the meta build); a refused cell names a way out that fits."""
    plan = make_plan(FIRST_COMMAND, gpu, host)
    if not plan.fits:
        assert host == 16 and all(way.plan.fits for way in ways_out(plan)) and ways_out(plan)
        return
    own = {name: sum(t.numel() * t.element_size() for t in model.state_dict().values())
           for name, model in (("dit", dit_on_meta(resolve_dit_config(DISTILLED), True)),
                               ("refiner_dit", dit_on_meta(resolve_dit_config(REFINER), True)))}
    for stage in plan.stages:
        assert stage.host_gib <= host, stage
        if stage.stage in own and stage.placement != "resident":
            assert stage.host_gib * GIB >= 2 * GIB + own[stage.stage]
