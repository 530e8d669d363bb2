"""`hyimage download` against a local stand-in for the Hub (an HTTP server on 127.0.0.1), offline and with a cache.

The stand-in is tests/fixtures/fake_hub.py.
"""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from loguru import logger

from hyimage.checkpoints.download import check_present, download, plan_download
from hyimage.checkpoints.needs import DownloadConfig
from hyimage.checkpoints.record import RECORD_FILE
from hyimage.cli import main
from hyimage.errors import DownloadError, HubUnreachableError, OfflineError, UnsafeListingError
from tests.fixtures.fake_hub import COMMIT, REPOS, FakeHub, closed_endpoint, is_lfs, point_hub_at


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _loguru_back_to_stderr():
    """`main` points loguru at the captured stderr of its test; point it back afterwards."""
    yield
    logger.remove()
    logger.add(sys.stderr)


def tree(root: Path) -> set[str]:
    """The files below `root`, bookkeeping (.cache) left out."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts}


SMALL = DownloadConfig(refiner=False, text_encoder=False, glyph=False)  # base DiT and image VAE


def test_base_configuration_fetches_exactly_its_files(hub: FakeHub, tmp_path: Path) -> None:
    config = DownloadConfig(variant="hunyuanimage-v2.1", fp8=False, refiner=True)
    download(config, tmp_path, endpoint=hub.endpoint, progress=False)
    assert tree(tmp_path) == {
        "dit/hunyuanimage2.1.safetensors",
        "dit/hunyuanimage-refiner.safetensors",
        "vae/vae_2_1/config.json",
        "vae/vae_2_1/pytorch_model.ckpt",
        "vae/vae_refiner/config.json",
        "vae/vae_refiner/pytorch_model.pt",
        "text_encoder/llm/config.json",
        "text_encoder/llm/model-00001-of-00002.safetensors",
        "text_encoder/llm/model-00002-of-00002.safetensors",
        "text_encoder/llm/model.safetensors.index.json",
        "text_encoder/llm/merges.txt",
        "text_encoder/byt5-small/config.json",
        "text_encoder/byt5-small/special_tokens_map.json",
        "text_encoder/byt5-small/tokenizer_config.json",
        "text_encoder/Glyph-SDXL-v2/text_encoder_2/config.json",
        "text_encoder/Glyph-SDXL-v2/text_encoder_2/model.safetensors",
        "text_encoder/Glyph-SDXL-v2/tokenizer_2/tokenizer_config.json",
        "text_encoder/Glyph-SDXL-v2/tokenizer_2/added_tokens.json",
    }
    official = REPOS["tencent/HunyuanImage-2.1"]
    assert (tmp_path / "dit/hunyuanimage2.1.safetensors").read_bytes() == official["dit/hunyuanimage2.1.safetensors"]

    hub.requests.clear()
    hub.api_requests.clear()
    assert download(config, tmp_path, endpoint=hub.endpoint, progress=False) == []
    assert hub.requests == [] and hub.api_requests == []  # everything recorded and present: not one request


def test_distilled_fp8_with_reprompt_configurations(hub: FakeHub, tmp_path: Path) -> None:
    config = DownloadConfig(variant="hunyuanimage-v2.1-distilled", fp8=True, refiner=False, reprompt="7b")
    files = plan_download(config, tmp_path, endpoint=hub.endpoint).files
    names = {f.destination.relative_to(tmp_path).as_posix() for f in files}
    official = {n for n in names if n.startswith(("dit/", "vae/", "reprompt/"))}
    assert official == {
        "dit/hunyuanimage2.1-distilled_fp8.safetensors",
        "dit/hunyuanimage2.1-distilled_fp8_scale.safetensors",
        "vae/vae_2_1/config.json",
        "vae/vae_2_1/pytorch_model.ckpt",
        "reprompt/config.json",
        "reprompt/model.safetensors",
    }
    big = DownloadConfig(reprompt="32b", text_encoder=False, glyph=False, refiner=False)
    files = plan_download(big, tmp_path, endpoint=hub.endpoint).files
    names = {f.destination.relative_to(tmp_path).as_posix() for f in files}
    assert names == {
        "dit/hunyuanimage2.1.safetensors",
        "vae/vae_2_1/config.json",
        "vae/vae_2_1/pytorch_model.ckpt",
        "reprompt_32b/config.json",
        "reprompt_32b/model-00001-of-00001.safetensors",
    }


def test_interrupted_transfer_resumes(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    """huggingface_hub's retry asks for the missing bytes only (a Range request) and the file arrives whole."""
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 256)  # chunks smaller than the cut
    config = DownloadConfig(
        variant="hunyuanimage-v2.1-distilled", fp8=True, refiner=False, text_encoder=False, glyph=False
    )
    name = "dit/hunyuanimage2.1-distilled_fp8.safetensors"
    hub.cut[name] = 1000
    download(config, tmp_path, endpoint=hub.endpoint, progress=False)
    ranges = [r for n, r in hub.requests if n == name and r not in (None, "HEAD")]
    assert ranges and 0 < int(re.fullmatch(r"bytes=(\d+)-", ranges[0])[1]) <= 1000
    assert (tmp_path / name).read_bytes() == REPOS["tencent/HunyuanImage-2.1"][name]


def test_corrupt_file_is_refused_and_deleted(hub: FakeHub, tmp_path: Path) -> None:
    hub.corrupt.add("vae/vae_2_1/pytorch_model.ckpt")
    with pytest.raises(DownloadError, match="pytorch_model.ckpt .*corrupt"):
        download(SMALL, tmp_path, endpoint=hub.endpoint, progress=False)
    assert not (tmp_path / "vae/vae_2_1/pytorch_model.ckpt").exists()


def test_unreachable_hub_is_a_clear_error(tmp_path: Path) -> None:
    endpoint = closed_endpoint()
    with pytest.raises(HubUnreachableError, match=re.escape(endpoint) + ".*HF_ENDPOINT"):
        download(DownloadConfig(), tmp_path, endpoint=endpoint, progress=False)


def test_download_command_names_the_configuration() -> None:
    config = DownloadConfig(variant="hunyuanimage-v2.1-distilled", fp8=True, refiner=False, reprompt="32b")
    expected = "hyimage download --variant hunyuanimage-v2.1-distilled --fp8 --no-refiner --reprompt 32b"
    assert config.command() == expected
    assert DownloadConfig(repo_id="me/HunyuanImage-copy").command().endswith("--repo-id me/HunyuanImage-copy")
    with pytest.raises(ValueError, match="variant 'sdxl'"):
        DownloadConfig(variant="sdxl")
    with pytest.raises(ValueError, match="repo_id"):
        DownloadConfig(repo_id="../etc")


def test_complete_download_works_offline(hub: FakeHub, tmp_path: Path, monkeypatch, capsys) -> None:
    """Once complete, `hyimage download` needs no network at all (the Hub endpoint is a closed port)."""
    point_hub_at(monkeypatch, hub.endpoint)
    args = ["download", "--no-refiner", "--model-root", str(tmp_path), "-q"]
    assert main(args) == 0
    hub.close()
    point_hub_at(monkeypatch, closed_endpoint())
    capsys.readouterr()
    assert main(args) == 0
    assert "everything for hunyuanimage-v2.1 is in" in capsys.readouterr().out
    assert download(SMALL, tmp_path, progress=False) == []  # a part of what is there
    assert main([*args, "--reprompt", "32b"]) == 1  # a repository never listed here needs the Hub
    assert "could not reach the Hugging Face Hub" in capsys.readouterr().err


def test_hf_hub_offline_is_honoured(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE is set.*never recorded.*unset HF_HUB_OFFLINE"):
        download(SMALL, tmp_path, endpoint=hub.endpoint, progress=False)
    assert hub.api_requests == [] and hub.requests == [] and tree(tmp_path) == set()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    download(SMALL, tmp_path, endpoint=hub.endpoint, progress=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub.api_requests.clear()
    hub.requests.clear()
    assert download(SMALL, tmp_path, endpoint=hub.endpoint, progress=False) == []
    (tmp_path / "vae/vae_2_1/pytorch_model.ckpt").unlink()
    with pytest.raises(OfflineError, match=r"HF_HUB_OFFLINE is set.*1 files .*missing: .*pytorch_model\.ckpt"):
        download(SMALL, tmp_path, endpoint=hub.endpoint, progress=False)
    assert hub.api_requests == [] and hub.requests == []


def test_hf_hub_offline_in_the_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    """Offline mode: the dry run says so and what cannot be known offline; a download refuses, naming the fix."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    point_hub_at(monkeypatch, closed_endpoint())
    command = ["download", "--model-root", str(tmp_path), "--no-refiner"]
    assert main([*command, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "HF_HUB_OFFLINE is set" in out and "not known offline" in out
    assert "tencent/HunyuanImage-2.1 -> ./: dit/hunyuanimage2.1.safetensors, vae/vae_2_1/*" in out
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE is set" in err and "unset HF_HUB_OFFLINE" in err and "Traceback" not in err
    assert not tmp_path.exists() or tree(tmp_path) == set()


@pytest.mark.slow
def test_hf_hub_offline_environment_variable(tmp_path: Path) -> None:
    """The variable itself (read by huggingface_hub at import), in a fresh process."""
    repository = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ENDPOINT=closed_endpoint(), PYTHONPATH=repository)
    cli = "import sys; from hyimage.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", cli, "download", "--model-root", str(tmp_path), "--dry-run"]
    dry = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "HF_HUB_OFFLINE is set" in dry.stdout and "not known offline" in dry.stdout


def test_dry_run_offline_says_what_is_known(hub: FakeHub, tmp_path: Path, monkeypatch, capsys) -> None:
    point_hub_at(monkeypatch, hub.endpoint)
    assert main(["download", "--variant", "distilled", "--no-refiner", "--model-root", str(tmp_path), "-q"]) == 0
    record = (tmp_path / RECORD_FILE).read_bytes()
    hub.close()
    point_hub_at(monkeypatch, closed_endpoint())
    capsys.readouterr()

    assert main(["download", "--variant", "distilled", "--no-refiner", "--model-root", str(tmp_path), "--dry-run"]) == 0
    assert "everything for hunyuanimage-v2.1-distilled is in" in capsys.readouterr().out

    args = ["download", "--variant", "base", "--reprompt", "32b", "--model-root", str(tmp_path), "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "the Hub is unreachable" in out
    size = len(REPOS["tencent/HunyuanImage-2.1"]["dit/hunyuanimage2.1.safetensors"]) / 1024
    assert re.search(rf"{size:.1f} KiB +dit/hunyuanimage2\.1\.safetensors", out)  # known from the record
    assert "dit/hunyuanimage-refiner.safetensors" in out
    assert "not known offline" in out and "PromptEnhancer/PromptEnhancer-32B -> reprompt_32b/" in out
    assert (tmp_path / RECORD_FILE).read_bytes() == record  # a dry run writes nothing
    assert not (tmp_path / "dit/hunyuanimage2.1.safetensors").exists()


def fake_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """The Hugging Face cache layout: blobs named by their hash, snapshot links per commit, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        blob = repo / "blobs" / (hashlib.sha256(data).hexdigest() if is_lfs(name) else "b" * 40)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_files_in_the_hf_cache_are_linked_not_downloaded(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    qwen = REPOS["Qwen/Qwen2.5-VL-7B-Instruct"]
    cache = tmp_path / "hf-cache"
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    damaged = b"x" * len(qwen[second])  # same size, other bytes: must not be used
    fake_hf_cache(cache, "Qwen/Qwen2.5-VL-7B-Instruct", {first: qwen[first], second: damaged})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    root = tmp_path / "ckpts"
    config = DownloadConfig(refiner=False, glyph=False)
    download(config, root, endpoint=hub.endpoint, progress=False)
    fetched = {name for name, _ in hub.requests}
    assert first not in fetched and second in fetched
    target = root / "text_encoder/llm" / first
    assert target.read_bytes() == qwen[first] and not target.is_symlink()
    blob = cache / "models--Qwen--Qwen2.5-VL-7B-Instruct/blobs" / hashlib.sha256(qwen[first]).hexdigest()
    assert os.path.samefile(target, blob)  # a hard link: no second copy on disk
    assert (root / "text_encoder/llm" / second).read_bytes() == qwen[second]


def hostile_repos(names: list[str]) -> dict[str, dict[str, bytes]]:
    official = dict(REPOS["tencent/HunyuanImage-2.1"])
    official.update({name: b"pwned" for name in names})
    return {**REPOS, "tencent/HunyuanImage-2.1": official}


@pytest.mark.parametrize(
    "name",
    ["vae/vae_2_1/../../../escaped.json", "/ABS/escaped.json", "C:escaped.json", "vae\\..\\..\\escaped.json",
     "vae/vae_2_1/..", "../escaped.safetensors"],
)
def test_listing_names_that_leave_the_root_write_nothing(tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    name = name.replace("/ABS", str(outside))
    root = tmp_path / "deep" / "ckpts"
    server = FakeHub(hostile_repos([name]))
    try:
        with pytest.raises(UnsafeListingError, match="not a relative path inside the repository"):
            download(SMALL, root, endpoint=server.endpoint, progress=False)
    finally:
        server.close()
    assert server.requests == []  # refused before any file was asked for
    assert list(outside.iterdir()) == [] and not (tmp_path / "escaped.json").exists()
    assert not root.exists() or tree(root) == set()


def test_symlinked_folder_out_of_the_root_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "ckpts"
    root.mkdir()
    (root / "vae").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeListingError, match=r"outside the model root .*symlink.*nothing was written"):
        download(SMALL, root, endpoint=hub.endpoint, progress=False)
    assert list(outside.iterdir()) == [] and hub.requests == []

    (root / "vae").unlink()
    download(SMALL, root, endpoint=hub.endpoint, progress=False)
    (root / "vae").rename(outside / "vae")
    (root / "vae").symlink_to(outside / "vae", target_is_directory=True)
    hub.requests.clear()
    assert download(SMALL, root, endpoint=hub.endpoint, progress=False) == []  # reading through a link is fine
    assert hub.requests == []


@pytest.mark.parametrize("body", [b"<!DOCTYPE html><html><body>Sign in to the Wi-Fi</body></html>", b"truncated"])
def test_listing_that_is_not_the_hubs_json_is_a_clear_error(hub: FakeHub, tmp_path: Path, body: bytes) -> None:
    if body == b"truncated":
        body = hub.listing("tencent/HunyuanImage-2.1")[:150]
    hub.listing_body["tencent/HunyuanImage-2.1"] = body
    with pytest.raises(UnsafeListingError, match="is not the Hub's JSON.*HF_ENDPOINT"):
        download(SMALL, tmp_path, endpoint=hub.endpoint, progress=False)
    assert tree(tmp_path) == set()


def test_verify_catches_a_same_size_corrupt_file(hub: FakeHub, tmp_path: Path, monkeypatch, capsys) -> None:
    point_hub_at(monkeypatch, hub.endpoint)
    args = ["download", "--no-refiner", "--model-root", str(tmp_path), "-q"]
    assert main(args) == 0
    name = "vae/vae_2_1/pytorch_model.ckpt"
    path = tmp_path / name
    stat = path.stat()
    path.write_bytes(b"\0" * stat.st_size)  # same size, same timestamps: only a hash tells
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    hub.requests.clear()
    assert main([*args, "--verify"]) == 0
    assert path.read_bytes() == REPOS["tencent/HunyuanImage-2.1"][name]
    assert {n for n, _ in hub.requests} == {name}  # only the damaged file was fetched again
    out = capsys.readouterr().out
    assert "will be hashed against the Hub's listing" in out and "done: 1 files put in place" in out


def test_loading_never_trusts_the_size_alone(hub: FakeHub, tmp_path: Path) -> None:
    """A changed file whose hash is known is hashed again before loading; a mismatch names the file and the fix."""
    download(SMALL, tmp_path, endpoint=hub.endpoint, progress=False)
    hub.close()
    path = tmp_path / "dit/hunyuanimage2.1.safetensors"
    check_present(SMALL, tmp_path, progress=False)  # unchanged: nothing to do
    path.write_bytes(path.read_bytes())  # same bytes, new time: hashed again, accepted
    check_present(SMALL, tmp_path, progress=False)
    size = path.stat().st_size
    path.write_bytes(b"\1" * size)
    with pytest.raises(DownloadError, match=r"hunyuanimage2\.1\.safetensors changed since .*--verify"):
        check_present(SMALL, tmp_path, progress=False)


def test_from_pretrained_takes_a_hub_repo_id(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline

    point_hub_at(monkeypatch, hub.endpoint)
    root = tmp_path / "ckpts"
    kwargs = dict(use_distilled=True, refiner=False, model_root=root, progress_bar=False)
    pipe = HunyuanImagePipeline.from_pretrained("tencent/HunyuanImage-2.1", **kwargs)
    assert isinstance(pipe, HunyuanImagePipeline)
    assert (root / "dit/hunyuanimage2.1-distilled.safetensors").is_file()
    assert not (root / "dit/hunyuanimage2.1.safetensors").exists()
    hub.close()
    point_hub_at(monkeypatch, closed_endpoint())
    HunyuanImagePipeline.from_pretrained("tencent/HunyuanImage-2.1", **kwargs)  # complete: offline

    dit = root / "dit/hunyuanimage2.1-distilled.safetensors"
    dit.write_bytes(b"\0" * dit.stat().st_size)  # same size, new time, other bytes
    local = dict(kwargs, model_name="hunyuanimage-v2.1-distilled")
    with pytest.raises(DownloadError, match=r"hunyuanimage2\.1-distilled\.safetensors changed since"):
        HunyuanImagePipeline.from_pretrained(**local)


def test_progress_bars_go_to_stderr_unless_off(hub: FakeHub, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # tqdm shows bars on terminals only
    download(SMALL, tmp_path / "a", endpoint=hub.endpoint, progress=True)
    captured = capsys.readouterr()
    assert "3 files" in captured.err and "hashing pytorch_model.ckpt" in captured.err and captured.out == ""
    download(SMALL, tmp_path / "b", endpoint=hub.endpoint, progress=False)
    assert "%|" not in capsys.readouterr().err
