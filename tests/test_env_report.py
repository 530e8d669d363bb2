"""`hyimage env`: what a bug report needs, as text and as JSON."""

import json
import platform
from pathlib import Path

import torch

from hyimage.checkpoints.layout import CheckpointLayout
from hyimage.cli import main
from hyimage.env_report import env_report


def test_report_names_versions_machine_and_absent_checkpoint_files(tmp_path: Path) -> None:
    layout = CheckpointLayout(tmp_path)
    present = [layout.dit("hunyuanimage-v2.1-distilled"), layout.vae / "config.json",
               layout.text_encoder / "config.json", layout.byt5 / "config.json", layout.glyph_checkpoint,
               layout.dit("hunyuanimage-refiner"), layout.refiner_vae / "config.json"]
    for path in present:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    report = env_report(tmp_path)
    assert report["versions"]["python"] == platform.python_version()
    assert report["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["ram"]["total_gib"] > 0 and report["model_root"]["free_disk_gib"] >= 0
    checkpoints = report["checkpoints"]
    assert checkpoints["hunyuanimage-v2.1-distilled"]["absent"] == []
    assert checkpoints["hunyuanimage-v2.1"]["absent"] == ["dit/hunyuanimage2.1.safetensors"]
    assert checkpoints["hunyuanimage-v2.1-distilled fp8"]["download_command"].endswith(
        f"--variant hunyuanimage-v2.1-distilled --fp8 --model-root {tmp_path}")


def test_cli_prints_text_and_json(tmp_path: Path, capsys) -> None:
    assert main(["env", "--model-root", str(tmp_path / "absent"), "-q"]) == 0
    text = capsys.readouterr().out
    assert "torch:" in text and "free_disk_gib" in text
    assert main(["env", "--json", "--model-root", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"versions", "torch", "gpus", "ram", "extras", "model_root", "checkpoints"} <= set(report)
    assert report["model_root"]["path"] == str(tmp_path)
