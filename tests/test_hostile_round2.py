"""Hostile input, round two: numeric options (finite, in range, named), the planner's strict JSON, LoRA files
(sniffed, named, no state left after a refusal, NaN refused) and batch jobs (no writes through links, damaged
results, long names, concurrent jobs)."""

import json
from pathlib import Path

import pytest

from hyimage.cli import main


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


# Numeric options.
PLAN_CASES = [
    ("--gpu-gb", "nan"), ("--gpu-gb", "inf"), ("--gpu-gb", "-inf"), ("--gpu-gb", "-1"), ("--gpu-gb", "0"),
    ("--gpu-gb", "1e999"), ("--ram-gb", "nan"), ("--ram-gb", "-8"), ("--ram-gb", "inf"), ("--width", "0"),
    ("--height", "100000"), ("--width", "nan"),
]


@pytest.mark.parametrize("flag, value", PLAN_CASES, ids=[" ".join(case) for case in PLAN_CASES])
def test_plan_refuses_non_finite_and_out_of_range_numbers(flag: str, value: str, capsys) -> None:
    argv = ["plan", "--gpu-gb", "24", flag, value] if flag != "--gpu-gb" else ["plan", flag, value]
    assert exit_code([*argv, "--json"]) == 2
    captured = capsys.readouterr()
    assert f"argument {flag}:" in captured.err and captured.out == ""


def strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_plan_json_is_strict_json(capsys) -> None:
    assert main(["plan", "--gpu-gb", "24", "--ram-gb", "64", "--json"]) == 0
    plan = strict_json(capsys.readouterr().out)
    assert plan["stages"]


@pytest.mark.parametrize("argv, flag", [
    (["batch", "P", "--out", "O", "--steps", "0"], "--steps"),
    (["batch", "P", "--out", "O", "--guidance-scale", "nan"], "--guidance-scale"),
    (["batch", "P", "--out", "O", "--shift", "inf"], "--shift"),
    (["batch", "P", "--out", "O", "--seed", "-5"], "--seed"),
    (["batch", "P", "--out", "O", "--width", "-64"], "--width"),
    (["generate", "x", "--host-budget-gb", "inf"], "--host-budget-gb"),
    (["generate", "x", "--host-budget-gb", "-1"], "--host-budget-gb"),
    (["generate", "x", "--gpu-budget-gb", "nan"], "--gpu-budget-gb"),
    (["serve", "--host-budget-gb", "nan"], "--host-budget-gb"),
])
def test_numeric_options_of_every_subcommand_are_checked(argv: list[str], flag: str, capsys, tmp_path: Path,
                                                         monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("P").write_text('{"prompt": "x"}\n')
    assert exit_code([*argv, "--model-root", str(tmp_path / "absent")]) in (1, 2)
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not Path("O").exists()
