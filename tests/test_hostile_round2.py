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


# Numeric options. (`--ram-gb inf` is no limit, as `host_budget_gb=float("inf")`: CONTRACT section 5.)
PLAN_CASES = [
    ("--gpu-gb", "nan"), ("--gpu-gb", "inf"), ("--gpu-gb", "-inf"), ("--gpu-gb", "-1"), ("--gpu-gb", "0"),
    ("--gpu-gb", "1e999"), ("--ram-gb", "nan"), ("--ram-gb", "-8"), ("--ram-gb", "-inf"), ("--width", "0"),
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
    (["generate", "x", "--host-budget-gb", "-inf"], "--host-budget-gb"),  # inf: no limit (issue 21)
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


# Batch jobs (over a stub pipeline: nothing loads).
class StubResult:
    def __init__(self, images, prompts):
        self.images, self.prompts = images, prompts


class StubPipe:
    calls: list[str]
    cache_stats = None  # no step cache (what a real pipeline reports when none is enabled)

    def __init__(self) -> None:
        self.calls = []

    def to(self, device):
        return self

    def load_lora_weights(self, path, scale):
        pass

    def __call__(self, *, prompt, width, height, **_):
        import torch

        self.calls.append(prompt)
        return StubResult(torch.full((1, 3, height, width), 0.25), [prompt])


@pytest.fixture
def stub(monkeypatch) -> StubPipe:
    import hyimage.cli.batch

    pipe = StubPipe()
    monkeypatch.setattr(hyimage.cli.batch, "pipeline_from_args", lambda *a, **k: pipe)
    return pipe


def batch(tmp_path: Path, lines: list, out: Path | None = None, raw: bytes | None = None) -> int:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(raw if raw is not None else "".join(json.dumps(e) + "\n" for e in lines).encode())
    out = out or tmp_path / "out"
    return exit_code(["batch", str(prompts), "--out", str(out), "--width", "32", "--height", "32", "--steps", "1",
                      "--seed", "1", "--device", "cpu", "--no-refiner", "--variant", "distilled",
                      "--model-root", str(tmp_path / "ckpts")])


def test_results_through_a_link_are_refused_before_drawing(stub: StubPipe, tmp_path: Path, capsys) -> None:
    out, outside = tmp_path / "out", tmp_path / "outside.txt"
    out.mkdir()
    outside.write_text("precious\n")
    (out / "results.jsonl").symlink_to(outside)
    assert batch(tmp_path, [{"prompt": "a fox"}]) == 1
    err = capsys.readouterr().err
    assert "symbolic link" in err and str(out / "results.jsonl") in err
    assert outside.read_text() == "precious\n" and stub.calls == []


def test_an_image_name_that_is_a_link_is_replaced_not_written_through(stub: StubPipe, tmp_path: Path) -> None:
    out, outside = tmp_path / "out", tmp_path / "outside.png"
    out.mkdir()
    outside.write_bytes(b"precious")
    (out / "00001.png").symlink_to(outside)
    assert batch(tmp_path, [{"prompt": "a fox"}]) == 0
    assert outside.read_bytes() == b"precious"
    assert not (out / "00001.png").is_symlink() and (out / "00001.png").read_bytes().startswith(b"\x89PNG")


def test_append_result_never_follows_a_link(tmp_path: Path) -> None:
    from hyimage.batch import append_result

    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    (tmp_path / "results.jsonl").symlink_to(outside)
    with pytest.raises(FileExistsError, match="symbolic link"):
        append_result(tmp_path, {"file": "x.png"})
    assert outside.read_text() == ""


def test_damaged_results_lines_are_skipped_and_named(stub: StubPipe, tmp_path: Path, capsys) -> None:
    lines = [{"prompt": "a fox"}, {"prompt": "a cat"}, {"prompt": "a dog"}]
    assert batch(tmp_path, lines) == 0 and len(stub.calls) == 3
    results = tmp_path / "out" / "results.jsonl"
    records = results.read_bytes().splitlines()
    # line 2 (the cat) damaged: not UTF-8; a stray line that is not JSON after it
    results.write_bytes(b"\n".join([records[0], b"\xff\xfe" + records[1], b"{not json", records[2]]) + b"\n")
    (tmp_path / "out" / "00002.png").unlink()
    capsys.readouterr()
    assert batch(tmp_path, lines) == 0
    err = capsys.readouterr().err
    assert f"{results}, line 2 is damaged" in err and f"{results}, line 3 is damaged" in err
    assert stub.calls[3:] == ["a cat"]  # only the missing image is drawn again


def test_prompts_that_are_not_utf8_name_file_and_line(stub: StubPipe, tmp_path: Path, capsys) -> None:
    raw = b'{"prompt": "a fox"}\n{"prompt": "caf\xe9"}\n'
    assert batch(tmp_path, [], raw=raw) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'prompts.jsonl'}, line 2 is not UTF-8" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry, words", [
    ({"prompt": "a fox", "name": "n" * 252}, "too long for a file name"),
    ({"prompt": "a fox", "name": "é" * 126}, "too long for a file name"),  # 252 bytes + .png
    ({"prompt": "a fox \ud800"}, "surrogate"),
    ({"prompt": "a fox", "steps": 5000}, "`steps`"),
    ({"prompt": "a fox", "guidance_scale": 1e6}, "`guidance_scale`"),
])
def test_bad_lines_are_refused_before_anything_runs(entry: dict, words: str, stub: StubPipe, tmp_path: Path,
                                                    capsys) -> None:
    assert batch(tmp_path, [{"prompt": "first"}, entry]) == 1
    err = capsys.readouterr().err
    assert words in err and "line 2" in err
    assert stub.calls == [] and not (tmp_path / "out").exists()


def test_a_name_of_255_bytes_with_png_is_drawn(stub: StubPipe, tmp_path: Path) -> None:
    assert batch(tmp_path, [{"prompt": "a fox", "name": "n" * 251}]) == 0
    assert (tmp_path / "out" / ("n" * 251 + ".png")).is_file()


def test_a_second_job_on_the_same_folder_refuses_while_the_first_runs(stub: StubPipe, tmp_path: Path,
                                                                       capsys) -> None:
    from hyimage.batch import lock_job_folder

    out = tmp_path / "out"
    out.mkdir()
    partial = out / ".batch-abc.partial.png"
    partial.write_bytes(b"the first job is writing this")
    with lock_job_folder(out):  # the first job, mid-run
        assert batch(tmp_path, [{"prompt": "a fox"}]) == 1
        assert partial.exists()  # the second job touched nothing of the first's
    err = capsys.readouterr().err
    assert "another hyimage batch job" in err and stub.calls == []
    assert batch(tmp_path, [{"prompt": "a fox"}]) == 0 and stub.calls == ["a fox"]
    assert not partial.exists()


# LoRA files.
class Payload:
    """Pickled by reference (a GLOBAL): torch's restricted unpickler must refuse it without calling anything."""


class Holder:
    """The LoRA mixin on a bare object with a DiT (what the pipelines give it)."""


@pytest.fixture
def holder():
    from hyimage.lora import LoraMixin
    from tests.fixtures.tiny_tree import TINY_DISTILLED, random_dit

    class DiTHolder(LoraMixin):
        memory = None

    held = DiTHolder()
    held.dit = random_dit(TINY_DISTILLED, seed=0)
    return held


def untouched(dit) -> bool:
    """No adapter, bank or hook left on the DiT."""
    from hyimage.lora.layers import BANK, adapter_names

    return not adapter_names(dit) and all(not hasattr(m, BANK) and not m._forward_hooks for m in dit.modules())


def lora_state(tmp_path: Path) -> dict:
    from safetensors.torch import load_file

    from tests.fixtures.tiny_tree import write_tiny_lora

    return load_file(write_tiny_lora(tmp_path / "source.safetensors"))


def test_a_safetensors_lora_is_sniffed_not_judged_by_its_suffix(holder, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    state = lora_state(tmp_path)
    save_file(state, tmp_path / "style.sft")
    torch.save(state, tmp_path / "zipped.safetensors")  # a torch zip behind a safetensors suffix: read as what it is
    assert holder.load_lora_weights(tmp_path / "style.sft") == "style"
    assert holder.load_lora_weights(tmp_path / "zipped.safetensors") == "zipped"
    banks = [getattr(m, "lora") for m in holder.dit.modules() if hasattr(m, "lora")]
    assert banks and all(torch.equal(b.style_down, b.zipped_down) and torch.equal(b.style_up, b.zipped_up)
                         for b in banks)


def test_a_pickle_that_would_run_code_is_refused_naming_the_file(holder, tmp_path: Path) -> None:
    import torch

    from hyimage.loading.torch_io import UnsafeCheckpointError

    for name, legacy in (("evil.pt", False), ("evil.ckpt", True)):
        path = tmp_path / name
        torch.save({"x": Payload()}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(UnsafeCheckpointError) as error:
            holder.load_lora_weights(path)
        message = str(error.value)
        assert str(path) in message and "weights_only=False" not in message
        assert untouched(holder.dit)


@pytest.mark.parametrize("content, words", [
    (b"", "empty"), (b"not a lora at all, just text", "neither a safetensors file nor a torch checkpoint"),
    (b"GGUF" + b"\0" * 20, "GGUF"), (b"\x20\0\0\0\0\0\0\0{\"a\": 1", "safetensors"),
])
def test_damaged_or_foreign_lora_files_are_named(holder, tmp_path: Path, content: bytes, words: str) -> None:
    from hyimage.errors import CheckpointError

    path = tmp_path / "lora.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=words) as error:
        holder.load_lora_weights(path)
    assert str(path) in str(error.value) and untouched(holder.dit)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_lora_values_are_refused_when_attached(holder, tmp_path: Path, value: float) -> None:
    from safetensors.torch import save_file

    from hyimage.loading.verify import NonFiniteWeightError

    state = lora_state(tmp_path)
    key = sorted(state)[1]
    state[key].view(-1)[3] = value
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(NonFiniteWeightError) as error:
        holder.load_lora_weights(path)
    assert str(path) in str(error.value) and key in str(error.value) and untouched(holder.dit)


@pytest.mark.parametrize("scale, kind", [(float("nan"), ValueError), (float("inf"), ValueError), ("0.5", TypeError),
                                         (None, TypeError), (True, TypeError)])
def test_a_bad_scale_leaves_nothing_behind(holder, tmp_path: Path, scale, kind) -> None:
    from tests.fixtures.tiny_tree import write_tiny_lora

    path = write_tiny_lora(tmp_path / "style.safetensors")
    with pytest.raises(kind, match="scale") as error:
        holder.load_lora_weights(path, scale=scale)
    assert str(path) in str(error.value) and untouched(holder.dit)
    holder.load_lora_weights(path, scale=0.5)
    if scale is not None:  # set_adapters(name, None) means scale 1
        with pytest.raises(kind, match="scale"):
            holder.set_adapters("style", scale)
    assert float(next(m.lora.style_scale for m in holder.dit.modules() if hasattr(m, "lora"))) == 0.5
