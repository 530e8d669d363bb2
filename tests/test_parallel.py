"""Parallel inference: the configuration and launch checks (before any model loads), and CFG-parallel,
Ulysses and CFG x Ulysses runs on 4 gloo ranks against one process (tests/fixtures/parallel_worker.py), and the VAE
decode on one rank per image group (tests/fixtures/parallel_decode_worker.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from hyimage import ParallelConfig
from hyimage.cli import main
from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline
from hyimage.errors import ParallelError
from hyimage.parallel.ulysses import even_split
from tests.fixtures.tiny_tree import TINY_BASE, TINY_DISTILLED, TINY_REFINER

REPO = Path(__file__).resolve().parent.parent
TORCHRUN_ENV = dict(RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")


@pytest.fixture
def configs_only(tmp_path: Path) -> Path:
    """A ckpts/ folder with the DiT configurations and no weights: a check that passes would then fail loading."""
    (tmp_path / "dit").mkdir()
    for stem, config in (("hunyuanimage2.1", TINY_BASE), ("hunyuanimage2.1-distilled", TINY_DISTILLED),
                         ("hunyuanimage-refiner", TINY_REFINER)):
        (tmp_path / "dit" / f"{stem}.json").write_text(json.dumps(config))
    return tmp_path


@pytest.fixture
def torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)


def test_parse() -> None:
    assert ParallelConfig.parse("cfg=2,sp=4") == ParallelConfig(2, 4) and ParallelConfig.parse("sp=3").size == 3
    for bad in ("cfg=2;sp=4", "tp=2", "cfg=x", "", "cfg=2,cfg=2"):
        with pytest.raises(ValueError, match="cfg=C,sp=S"):
            ParallelConfig.parse(bad)
    with pytest.raises(ValueError, match="cfg is 1 or 2"):
        ParallelConfig(cfg=4)
    assert even_split(26, 4) == [7, 7, 6, 6] and even_split(28, 8) == [4, 4, 4, 4, 3, 3, 3, 3]


@pytest.mark.parametrize(
    "model_name, parallel, message",
    [
        ("hunyuanimage-v2.1", ParallelConfig(sp=3), r"sp=3 is more than the 2 attention heads of hunyuanimage-v2.1"),
        ("hunyuanimage-v2.1-distilled", ParallelConfig(cfg=2),
         r"cfg=2 needs classifier-free guidance, which hunyuanimage-v2.1-distilled does not use"),
    ],
)
def test_a_configuration_the_model_cannot_run_is_refused_before_loading(
    configs_only: Path, torchrun_env: None, model_name: str, parallel: ParallelConfig, message: str
) -> None:
    with pytest.raises(ParallelError, match=message):
        HunyuanImagePipeline.from_pretrained(model_name, model_root=configs_only, parallel=parallel)


def test_launch_errors_are_explained_before_loading(
    configs_only: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ParallelError, match=r"needs 2 processes started by torchrun.*torchrun --nproc-per-node 2"):
        HunyuanImagePipeline.from_pretrained(model_root=configs_only, parallel=ParallelConfig(sp=2))
    assert main(["generate", "a fox", "--parallel", "cfg=2", "--model-root", str(configs_only)]) == 1
    assert "torchrun" in capsys.readouterr().err

    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ParallelError, match=r"cfg=2,sp=1 needs exactly 2 processes but torchrun started 4"):
        HunyuanImagePipeline.from_pretrained(model_root=configs_only, parallel=ParallelConfig(cfg=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_gloo_available", lambda: False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ParallelError, match=r"gloo backend \(needed on the CPU\) is missing"):
        HunyuanImagePipeline.from_pretrained(model_root=configs_only, parallel=ParallelConfig(cfg=2))
    assert not dist.is_initialized()


@pytest.mark.slow
def test_parallel_layouts_give_the_single_process_latents(tmp_path: Path) -> None:
    """CFG-parallel (2 ranks), Ulysses (2 and 4 ranks, uneven heads and tokens at 4), CFG x Ulysses (2 x 2) for
    the base model (OCR and general samples, CFG-to-APG switch) and the distilled model; the refiner's DiT on 2;
    an FP8 base model with block streaming on 2."""
    out = tmp_path / "errors.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
               str(REPO / "tests/fixtures/parallel_worker.py"), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    errors = {k: v for k, v in results.items() if not k.endswith("all-to-alls")}
    assert set(errors) == {
        "base cfg=2,sp=1", "base cfg=1,sp=2", "distilled cfg=1,sp=2", "refiner cfg=1,sp=2", "fp8 block cfg=1,sp=2",
        "base cfg=2,sp=2", "base cfg=1,sp=4", "distilled cfg=1,sp=4",
    }
    assert all(error <= 1e-5 for error in errors.values()), errors
    assert all(results[f"{k} all-to-alls"] > 0 for k in errors if "sp=1" not in k)
    assert results["base cfg=2,sp=1 all-to-alls"] == 0


@pytest.mark.slow
def test_one_rank_per_image_group_decodes_and_every_rank_returns_its_images(tmp_path: Path) -> None:
    """Under --parallel the writer (cfg rank 0, sp rank 0) of each image group builds and runs the VAE, the other
    ranks receive its images: sp=2 on 4 ranks (two data-parallel groups, writers 0 and 2), with and without the
    refiner after it (whose sequence-parallel DiT needs the pixels on every rank), and cfg=2 x sp=2 (writer 0); when
    the writer fails, the other ranks raise instead of waiting for its images."""
    out = tmp_path / "decode.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
               str(REPO / "tests/fixtures/parallel_decode_worker.py"), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    failures = results.pop("writer fails")
    assert failures[0] == failures[2] == "RuntimeError: the VAE file is damaged"
    assert failures[1] == "ParallelError: rank 0, which decodes this image group's images, failed; see its error"
    assert failures[3] == "ParallelError: rank 2, which decodes this image group's images, failed; see its error"
    assert set(results) == {"distilled cfg=1,sp=2", "distilled refined cfg=1,sp=2", "base cfg=2,sp=2"}
    writers = {"distilled cfg=1,sp=2": [1, 0, 1, 0], "distilled refined cfg=1,sp=2": [1, 0, 1, 0],
               "base cfg=2,sp=2": [1, 0, 0, 0]}
    for name, result in results.items():
        assert result["vae_builds"] == writers[name], name
        assert result["same_on_every_rank"], name
        assert all(error <= 1e-5 for error in result["errors"]), (name, result["errors"])
