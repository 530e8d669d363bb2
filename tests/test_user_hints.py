"""Hints that keep the user's configuration (issue 22 item 10): download commands with the user's flags, a resumable
Ctrl-C in `hyimage batch`, "did you mean" for batch keys, aspect-ratio spellings, the nearest valid size in
`hyimage plan`, and a warning for an empty prompt."""

import json
from pathlib import Path

import pytest
import torch

import hyimage.cli.batch
import hyimage.cli.generate
from hyimage.cli import main
from hyimage.cli.console import build_parser
from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline
from hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline import HunyuanImageRefinerPipeline
from hyimage.errors import MissingCheckpointError
from hyimage.variants import DISTILLED, aspect_ratio_spelling
from tests.fixtures.tiny_dit import TINY_CONFIGS, tiny_model
from tests.fixtures.tiny_pipeline import make_pipe, tiny_vae


# A missing checkpoint folder: the download command for the configuration asked for.
def test_a_missing_model_root_suggests_the_download_of_the_configuration_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    nowhere = tmp_path / "nowhere"
    with pytest.raises(MissingCheckpointError) as error:
        HunyuanImagePipeline.from_pretrained(DISTILLED, use_fp8=True, refiner=False, model_root=nowhere)
    assert f"`hyimage download --variant {DISTILLED} --fp8 --no-refiner --model-root {nowhere}`" in str(error.value)
    with pytest.raises(MissingCheckpointError) as error:
        HunyuanImageRefinerPipeline.from_pretrained(use_fp8=True, model_root=nowhere)
    assert f"`hyimage download --refiner-only --fp8 --model-root {nowhere}`" in str(error.value)

    code = main(["generate", "a fox", "--variant", "distilled", "--fp8", "--model-root", str(nowhere)])
    err = capsys.readouterr().err
    assert code == 1 and f"hyimage download --variant {DISTILLED} --fp8 --model-root {nowhere}`" in err
    assert not nowhere.exists()


def test_a_missing_part_suggests_the_download_of_the_configuration_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "ckpts"
    root.mkdir()
    code = main(["generate", "a fox", "--variant", "distilled", "--fp8", "--no-refiner", "--model-root", str(root)])
    err = capsys.readouterr().err
    assert code == 1 and "hunyuanimage2.1-distilled_fp8.safetensors not found" in err
    assert f"`hyimage download --variant {DISTILLED} --fp8 --no-refiner --model-root {root}`" in err


# Ctrl-C in a batch job.
class InterruptedPipe:
    """Draws `before` images, then the user presses Ctrl-C."""

    cache_stats = None

    def __init__(self, before: int) -> None:
        self.before, self.calls = before, 0

    def to(self, device: str) -> "InterruptedPipe":
        return self

    def __call__(self, *, prompt: str, width: int, height: int, **_: object) -> object:
        self.calls += 1
        if self.calls > self.before:
            raise KeyboardInterrupt
        images = torch.full((1, 3, height, width), 0.25)
        return type("Result", (), {"images": images, "prompts": [prompt]})()


@pytest.mark.parametrize("overwrite", [False, True])
def test_ctrl_c_in_batch_says_that_rerunning_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, overwrite: bool
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"fox {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "out"
    monkeypatch.setattr(hyimage.cli.batch, "pipeline_from_args", lambda *a, **k: InterruptedPipe(before=1))
    argv = ["batch", str(prompts), "--out", str(out), "--width", "32", "--height", "32", "--steps", "1", "--seed", "1",
            "--device", "cpu", "--no-refiner", "--variant", "distilled", "--model-root", str(tmp_path)]
    code = main(argv + (["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err
    assert code == 130
    again = "the same command without --overwrite" if overwrite else "the same command again"
    assert f"interrupted: 1 of 3 images are done in {out}; run {again} to draw the other 2" in err
    assert (out / "00001.png").is_file() and not (out / "00002.png").exists()


def test_ctrl_c_elsewhere_still_says_interrupted(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def interrupt(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(hyimage.cli.generate, "run_generate", interrupt)  # registered when the parser is built
    assert main(["generate", "a fox"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


# Batch keys.
def test_a_mistyped_batch_key_gets_did_you_mean(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"promt": "a fox", "seeds": 3, "zzz": 1}) + "\n")
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "line 1: unknown key 'promt' (did you mean 'prompt'?), 'seeds' (did you mean 'seed'?), 'zzz';" in err


# Aspect ratios.
@pytest.mark.parametrize("spelled", ["16:9", "16x9", "16X9", "16/9", "16×9", " 16 : 9 "])
def test_aspect_ratio_spellings_read_as_the_preset(spelled: str) -> None:
    parser = build_parser()
    for command in (["generate", "a fox"], ["batch", "p.jsonl", "--out", "o"]):
        assert parser.parse_args([*command, "--aspect-ratio", spelled]).aspect_ratio == "16:9"
    assert aspect_ratio_spelling("5x4") == "5x4" and aspect_ratio_spelling("1x1x1") == "1x1x1"


@pytest.mark.parametrize("command", ["generate", "batch"])
@pytest.mark.parametrize("extra, words", [
    (["--aspect-ratio", "5x4"], "--aspect-ratio '5x4' is not an official preset; choose one of 1:1, 16:9"),
    (["--aspect-ratio", "16x9", "--width", "64"], "--aspect-ratio and --width/--height were both given"),
])
def test_aspect_ratio_errors_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str, extra: list[str], words: str
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a fox"}) + "\n")
    first = ["generate", "a fox"] if command == "generate" else ["batch", str(prompts), "--out", str(tmp_path / "o")]
    assert main([*first, *extra, "--model-root", str(tmp_path / "nowhere")]) == 1
    assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# Sizes in `hyimage plan`.
@pytest.mark.parametrize("width, nearest", [("1000", 992), ("5000", 4096), ("16", 32)])
def test_plan_names_the_nearest_valid_size(capsys: pytest.CaptureFixture, width: str, nearest: int) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--gpu-gb", "24", "--width", width])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "argument --width: must be a multiple of 32" in err and f"the nearest valid size is {nearest}" in err


# An empty prompt.
@pytest.fixture
def tiny_pipe() -> HunyuanImagePipeline:
    return make_pipe(tiny_model(TINY_CONFIGS[DISTILLED]), tiny_vae())


@pytest.mark.parametrize("prompt, words", [("", "the prompt is empty"), ("  \n", "the prompt is empty"),
                                           (["a fox", " "], "prompts 1 (from 0) are empty")])
def test_an_empty_prompt_warns(tiny_pipe: HunyuanImagePipeline, warnings_logged: list[str], prompt, words) -> None:
    tiny_pipe(prompt=prompt, width=32, height=32, num_inference_steps=1, seed=0, output_type="latent")
    assert any(words in message and "nothing to draw" in message for message in warnings_logged)


def test_a_prompt_warns_nothing(tiny_pipe: HunyuanImagePipeline, warnings_logged: list[str]) -> None:
    tiny_pipe(prompt="a fox", width=32, height=32, num_inference_steps=1, seed=0, output_type="latent")
    assert warnings_logged == []


def test_an_empty_prompt_warns_on_the_command_line(
    tiny_pipe: HunyuanImagePipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(hyimage.cli.generate, "pipeline_from_args", lambda *a, **k: tiny_pipe)
    out = tmp_path / "empty.png"
    code = main(["generate", " ", "--variant", "distilled", "--no-refiner", "--width", "64", "--height", "64",
                 "--steps", "1", "--seed", "0", "--device", "cpu", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and out.is_file(), err
    assert err.count("the prompt is empty") == 1 and "WARNING" in err
