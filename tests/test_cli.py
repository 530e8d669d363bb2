"""The `hyimage` command line: arguments, output paths, overwrite refusal, download plans.

Generation and refinement through the CLI run in test_end_to_end.py.
"""

import socket
from pathlib import Path

import pytest

from hyimage.cli import main
from hyimage.cli.console import build_parser
from hyimage.cli.output import output_paths
from tests.fixtures.fake_hub import FakeHub, point_hub_at


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    server = FakeHub()
    point_hub_at(monkeypatch, server.endpoint)
    yield server
    server.close()


def test_output_paths() -> None:
    assert output_paths(Path("a/b.png"), 1) == [Path("a/b.png")]
    assert output_paths(Path("b.png"), 3) == [Path("b-0.png"), Path("b-1.png"), Path("b-2.png")]
    with pytest.raises(ValueError, match="must end in .png"):
        output_paths(Path("b.jpg"), 1)


def test_generate_arguments() -> None:
    args = build_parser().parse_args(
        ["generate", "a fox", "--variant", "distilled", "--fp8", "--no-refiner", "--aspect-ratio", "16:9",
         "--gpu-budget-gb", "12", "--reprompt", "7b", "--steps", "8"]
    )
    assert (args.variant, args.fp8, args.refiner, args.aspect_ratio) == ("distilled", True, False, "16:9")
    assert (args.gpu_budget_gb, args.reprompt, args.steps, args.memory_mode) == (12.0, "7b", 8, None)


def test_generate_refuses_to_overwrite_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"not yours")
    # the model root does not exist: reaching the loader would fail differently
    code = main(["generate", "a fox", "-o", str(existing), "--model-root", str(tmp_path / "none")])
    assert code == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"not yours"


def test_download_dry_run_prints_the_plan_and_sizes(hub: FakeHub, tmp_path: Path, capsys) -> None:
    args = ["download", "--variant", "distilled", "--fp8", "--no-refiner", "--model-root", str(tmp_path), "--dry-run"]
    code = main(args)
    assert code == 0
    out = capsys.readouterr().out
    assert "dit/hunyuanimage2.1-distilled_fp8.safetensors" in out and "hunyuanimage-refiner" not in out
    assert "text_encoder/Glyph-SDXL-v2/text_encoder_2/model.safetensors" in out and "KiB" in out
    assert not any(tmp_path.iterdir())  # nothing fetched


def test_download_refiner_only(hub: FakeHub, tmp_path: Path) -> None:
    assert main(["download", "--refiner-only", "--model-root", str(tmp_path)]) == 0
    fetched = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert "dit/hunyuanimage-refiner.safetensors" in fetched and "vae/vae_refiner/pytorch_model.pt" in fetched
    assert not any(name.startswith(("dit/hunyuanimage2.1", "vae/vae_2_1", "text_encoder/Glyph")) for name in fetched)
    assert "text_encoder/llm/config.json" in fetched


def test_generate_download_with_hub_unreachable_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    point_hub_at(monkeypatch, endpoint)
    code = main(["generate", "a fox", "--download", "--model-root", str(tmp_path), "-o", str(tmp_path / "x.png")])
    assert code == 1
    assert "could not reach the Hugging Face Hub" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "a fox"], ["batch", "prompts.jsonl", "--out", "out"], ["serve"]])
def test_dit_file_and_budgets_are_checked_before_loading(command: list[str], tmp_path: Path, capsys) -> None:
    """generate, batch and serve take --dit-file (a GGUF or single-file DiT); a path that is not a file, or a
    negative budget, is refused before any checkpoint is looked for."""
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a fox"}\n')
    command = [str(tmp_path / part) if part in ("prompts.jsonl", "out") else part for part in command]
    root = ["--model-root", str(tmp_path / "no-ckpts")]
    assert main([*command, *root, "--dit-file", str(tmp_path / "absent.gguf")]) == 1
    assert f"--dit-file {tmp_path / 'absent.gguf'} is not a file" in capsys.readouterr().err
    assert main([*command, *root, "--gpu-budget-gb", "-1"]) == 1
    assert "--gpu-budget-gb" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dit_file_reaches_from_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hyimage.cli.options import pipeline_from_args
    from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline

    dit = tmp_path / "hunyuanimage2.1-distilled-Q4_K.gguf"
    dit.write_bytes(b"GGUF")
    seen = {}
    monkeypatch.setattr(HunyuanImagePipeline, "from_pretrained", lambda **kwargs: seen.update(kwargs))
    args = build_parser().parse_args(["generate", "a fox", "--dit-file", str(dit)])
    pipeline_from_args(args, "hunyuanimage-v2.1-distilled", None)
    assert seen["dit_file"] == dit
    with pytest.raises(SystemExit):  # refine loads the refiner's own DiT: no --dit-file
        build_parser().parse_args(["refine", "x.png", "--prompt", "p", "--dit-file", str(dit)])
