"""`hyimage batch`: line checks, names and seeds, atomic resumable writes, and the same images on 1 or 2 ranks.

The multi-rank runs start `torchrun --standalone` (gloo on the CPU, rendezvous on localhost) on the tiny
checkpoint tree with the distilled model at 64x64, 1 step, no refiner.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hyimage.batch
from hyimage.batch import PARTIAL_SUFFIX, RESULTS, read_prompts
from hyimage.checkpoints.layout import MODEL_ROOT_ENV
from hyimage.cli import main
from tests.fixtures.qwen_tokenizer import build_qwen_tokenizer_once
from tests.fixtures.tiny_tree import write_tiny_tree

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    {"prompt": "a red fox", "seed": 7},
    {"prompt": 'a sign that reads "OPEN"', "name": "sign"},
    {"prompt": "a blue bird", "negative_prompt": "blurry", "width": 96},
    {"prompt": "a green frog", "steps": 2, "guidance_scale": 4.0},
    {"prompt": "a yellow duck", "name": "duck", "height": 32},
]
FILES = ["00001.png", "sign.png", "00004.png", "00005.png", "duck.png"]  # line 3 is blank
OPTIONS = ["--variant", "distilled", "--no-refiner", "--width", "64", "--height", "64", "--steps", "1",
           "--seed", "100", "--device", "cpu"]


def write_prompts(path: Path, entries: list, blank_at: int = 2) -> Path:
    lines = [json.dumps(e) if not isinstance(e, str) else e for e in entries]
    lines.insert(blank_at, "   ")
    path.write_text("\n".join(lines) + "\n")
    return path


# Checks before anything runs.
@pytest.mark.parametrize(
    "entry, message",
    [
        ('{"prompt": "a fox"', r"line 2 is not valid JSON"),
        ('["a fox"]', r"line 2 is not a JSON object"),
        ({"prompt": "a fox", "sede": 1}, r"line 2: unknown key 'sede'"),
        ({"negative_prompt": "x"}, r"line 2: `prompt` must be a non-empty string"),
        ({"prompt": "a fox", "seed": -1}, r"line 2: `seed` must be an integer"),
        ({"prompt": "a fox", "steps": 1.5}, r"line 2: `steps` must be an integer"),
        ({"prompt": "a fox", "width": 100}, r"line 2: `width`=100 must be a multiple of 32, e.g. 96"),
        ({"prompt": "a fox", "guidance_scale": "high"}, r"line 2: `guidance_scale` must be a number"),
        ({"prompt": "a fox", "name": "../escape"}, r"line 2: `name` '../escape' must be a plain file stem"),
        ({"prompt": "a fox", "name": "sub/dir"}, r"line 2: `name` 'sub/dir' must be a plain file stem"),
        ({"prompt": "a fox", "name": "fox.png"}, r"leave out .png"),
        ({"prompt": "a fox", "name": "00001"}, r"line 2: its image 00001.png is also line 1's"),
    ],
)
def test_bad_line_is_refused_naming_the_line_before_anything_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry, message: str
) -> None:
    prompts = tmp_path / "p.jsonl"
    bad = entry if isinstance(entry, str) else json.dumps(entry)
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n" + bad + "\n")
    with pytest.raises(ValueError, match=message) as error:
        read_prompts(prompts)
    assert str(prompts) in str(error.value)
    # through the CLI: refused with exit code 1 and nothing created (the model root does not even exist)
    monkeypatch.setenv(MODEL_ROOT_ENV, str(tmp_path / "no-ckpts"))
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_names_and_seeds_per_line(tmp_path: Path) -> None:
    from hyimage.batch import resolve_jobs
    from hyimage.cli.console import build_parser
    from hyimage.variants import DISTILLED_DEFAULTS

    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    lines = read_prompts(prompts)
    assert [entry.line for entry in lines] == [1, 2, 4, 5, 6] and [e.file for e in lines] == FILES

    args = build_parser().parse_args(["batch", str(prompts), "--out", "o", *OPTIONS])
    jobs = resolve_jobs(lines, args, DISTILLED_DEFAULTS)
    assert [j.seed for j in jobs] == [7, 101, 103, 104, 105]  # the line's seed, else --seed + line - 1
    assert [(j.width, j.height) for j in jobs] == [(64, 64), (64, 64), (96, 64), (64, 64), (64, 32)]
    assert [j.steps for j in jobs] == [1, 1, 1, 2, 1] and jobs[3].guidance_scale == 4.0
    assert jobs[0].guidance_scale == DISTILLED_DEFAULTS.guidance_scale and jobs[0].shift == DISTILLED_DEFAULTS.shift
    assert jobs[2].negative_prompt == "blurry" and jobs[0].negative_prompt == ""

    args = build_parser().parse_args(["batch", str(prompts), "--out", "o", "--variant", "distilled"])
    seeds = [j.seed for j in resolve_jobs(lines, args, DISTILLED_DEFAULTS)]
    assert seeds[0] == 7 and all(isinstance(s, int) for s in seeds)  # random where nothing fixes it
    assert (jobs[0].width, resolve_jobs(lines, args, DISTILLED_DEFAULTS)[1].width) == (64, 2048)


def test_parallel_option_is_checked_when_parsed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["batch", "p.jsonl", "--out", "o", "--parallel", "cfg=3"])
    assert "cfg is 1 or 2" in capsys.readouterr().err


# Running.
@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_qwen_tokenizer_once(str(tmp_path_factory.getbasetemp()))
    return write_tiny_tree(tmp_path_factory.mktemp("ckpts"), tokenizer)


@pytest.fixture(scope="module")
def reference(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 5 images drawn in this process, one rank."""
    folder = tmp_path_factory.mktemp("reference")
    prompts = write_prompts(folder / "prompts.jsonl", PROMPTS)
    assert main(["batch", str(prompts), "--out", str(folder / "out"), "--model-root", str(tree), *OPTIONS]) == 0
    return folder / "out"


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]


def stamps(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}


def torchrun(tree: Path, args: list[str], ranks: int = 2, kill: str | None = None) -> subprocess.CompletedProcess:
    # the ranks compute with as many threads as this process (torchrun would set 1), so the kernels match
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.pop("HYIMAGE_TEST_KILL", None)
    if kill:
        env["HYIMAGE_TEST_KILL"] = kill
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(REPO / "tests/fixtures/batch_worker.py"), "batch", *args, "--model-root", str(tree), *OPTIONS]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_one_rank_writes_images_metadata_and_results(reference: Path) -> None:
    assert sorted(p.name for p in reference.iterdir()) == sorted([*FILES, RESULTS])
    rows = records(reference)
    assert [r["line"] for r in rows] == [1, 2, 4, 5, 6] and [r["file"] for r in rows] == FILES
    for row in rows:
        assert {"prompt", "seed", "width", "height", "steps", "guidance_scale"} <= set(row)
        image = Image.open(reference / row["file"])
        assert image.size == (row["width"], row["height"])
        settings = json.loads(image.text["hyimage"])
        assert settings["seed"] == row["seed"] and settings["line"] == row["line"] and "prompt" not in image.text
        assert f"Seed: {row['seed']}" in image.text["parameters"]
    assert len({pixels(reference / f).tobytes() for f in ("00001.png", "sign.png")}) == 2


def records_tolerant(out: Path) -> list[dict]:
    rows = []
    for line in (out / RESULTS).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


@pytest.mark.slow
def test_killed_while_writing_leaves_no_partial_file_and_rerun_finishes(
    reference: Path, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM arrives between the temporary file and the rename of the second image; the rerun also meets
    leftovers of a rougher kill (a stray temporary file, half a record, an unrecorded file); --overwrite redoes all."""
    replace = os.replace
    calls = []

    def replace_with_kill(source, target):
        calls.append(target)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return replace(source, target)

    monkeypatch.setattr(hyimage.batch.os, "replace", replace_with_kill)
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:2])  # the first 2 lines: fewer images to draw
    files = FILES[:2]
    out = tmp_path / "out"
    command = ["batch", str(prompts), "--out", str(out), "--model-root", str(tree), *OPTIONS]
    with pytest.raises(SystemExit) as stop:
        main(command)
    assert stop.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in out.iterdir()) == ["00001.png", RESULTS]
    monkeypatch.setattr(hyimage.batch.os, "replace", replace)

    (out / "sign.png").write_bytes(b"half a png")  # on disk but not recorded: not complete
    (out / f".sign.1234{PARTIAL_SUFFIX}").write_bytes(b"left by a killed run")
    with (out / RESULTS).open("a") as results:
        results.write('{"line": 2, "fi')
    before = stamps(out)
    assert main(command) == 0
    assert stamps(out)["00001.png"] == before["00001.png"]  # complete: not rewritten
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, RESULTS])
    assert [r["file"] for r in records_tolerant(out)] == files  # each once
    assert all(np.array_equal(pixels(out / name), pixels(reference / name)) for name in files)

    assert main([*command, "--overwrite"]) == 0
    assert [r["file"] for r in records(out)] == files  # results.jsonl afresh, every line redone
    assert stamps(out)["00001.png"] != before["00001.png"]


@pytest.mark.slow
def test_two_ranks_draw_the_same_images_and_a_killed_run_resumes(reference: Path, tree: Path, tmp_path: Path) -> None:
    """Rank 1 dies (SIGTERM) right after recording its first image and torchrun stops rank 0; the job started
    again on 2 ranks draws each missing image once. All 5 images equal the 1-rank ones, byte for byte."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "out"
    killed = torchrun(tree, [str(prompts), "--out", str(out)], kill="1:1")
    assert killed.returncode != 0
    assert not list(out.glob(f".*{PARTIAL_SUFFIX}"))
    first = records_tolerant(out)
    finished = {r["file"] for r in first}
    assert "sign.png" in finished and len(finished) < len(FILES)  # rank 1's first line is line 2
    before = stamps(out)

    done = torchrun(tree, [str(prompts), "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    second = records_tolerant(out)[len(first):]
    assert sorted(r["file"] for r in second) == sorted(set(FILES) - finished)  # each missing image once
    assert {name: stamps(out)[name] for name in finished} == {name: before[name] for name in finished}
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, RESULTS])
    for name in FILES:
        assert np.array_equal(pixels(out / name), pixels(reference / name)), name


def test_lora_argument_is_checked_before_anything_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.fixtures.tiny_tree import write_tiny_lora

    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1])
    lora = write_tiny_lora(tmp_path / "style.safetensors")
    root = ["--model-root", str(tmp_path / "no-ckpts")]
    for spec, message in (
        (str(tmp_path / "absent.safetensors:0.5"), f"--lora {tmp_path / 'absent.safetensors'} does not exist"),
        (f"{lora}:strong", f"--lora {lora}:strong: the scale 'strong' after ':' is not a number"),
        (f"{lora}:nan", f"--lora {lora}:nan: the scale must be a finite number"),
    ):
        for command in (["batch", str(prompts), "--out", str(tmp_path / "out")], ["generate", "a fox"]):
            assert main([*command, "--lora", spec, *root]) == 1
            assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_lora_applies_to_every_line_as_generate_applies_it(tree: Path, tmp_path: Path) -> None:
    """One line drawn with --lora FILE:0.5 differs from the line drawn without and equals `hyimage generate`'s image
    with the same LoRA, scale and seed."""
    from tests.fixtures.tiny_tree import write_tiny_lora

    lora = write_tiny_lora(tmp_path / "style.safetensors")
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1])
    common = ["--model-root", str(tree), *OPTIONS]
    assert main(["batch", str(prompts), "--out", str(tmp_path / "plain"), *common]) == 0
    assert main(["batch", str(prompts), "--out", str(tmp_path / "lora"), "--lora", f"{lora}:0.5", *common]) == 0
    generate = ["generate", PROMPTS[0]["prompt"], "--seed", str(PROMPTS[0]["seed"]), "-o", str(tmp_path / "g.png")]
    options = [o for i, o in enumerate(OPTIONS) if o != "--seed" and OPTIONS[i - 1] != "--seed"]  # generate's own
    assert main([*generate, "--lora", f"{lora}:0.5", "--model-root", str(tree), *options]) == 0
    with_lora = pixels(tmp_path / "lora" / "00001.png")
    assert not np.array_equal(with_lora, pixels(tmp_path / "plain" / "00001.png"))
    assert np.array_equal(with_lora, pixels(tmp_path / "g.png"))
    assert records(tmp_path / "lora")[0]["lora"] == [f"{lora}:0.5"]
