"""`hyimage download` against a local stand-in for the Hub (an HTTP server on 127.0.0.1).

The stand-in answers the two calls the real Hub answers: the repository listing with file
metadata (`/api/models/<repo>/revision/<rev>?blobs=true`, read by huggingface_hub's HfApi)
and file downloads (`/<repo>/resolve/<rev>/<path>`, with HTTP ranges).
"""

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hyimage.loading.download import (
    DownloadConfig,
    DownloadError,
    HubUnreachableError,
    download,
    list_files,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def official_repo() -> dict[str, bytes]:
    files = {}
    for stem in ("hunyuanimage2.1", "hunyuanimage2.1-distilled", "hunyuanimage-refiner"):
        files[f"dit/{stem}.safetensors"] = stem.encode() * 3000
        files[f"dit/{stem}_fp8.safetensors"] = stem.encode() * 1500
        files[f"dit/{stem}_fp8_scale.safetensors"] = stem.encode() * 10
    files.update({
        "vae/vae_2_1/config.json": b'{"latent_channels": 64}',
        "vae/vae_2_1/pytorch_model.ckpt": b"v" * 5000,
        "vae/vae_refiner/config.json": b'{"latent_channels": 32}',
        "vae/vae_refiner/pytorch_model.pt": b"r" * 5000,
        "reprompt/config.json": b"{}",
        "reprompt/model.safetensors": b"p" * 4000,
        "README.md": b"# card",
        ".gitattributes": b"*.safetensors filter=lfs",
    })
    return files


REPOS = {
    "tencent/HunyuanImage-2.1": official_repo(),
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        "config.json": b"{}",
        "model-00001-of-00002.safetensors": b"q" * 6000,
        "model-00002-of-00002.safetensors": b"w" * 6000,
        "model.safetensors.index.json": b"{}",
        "merges.txt": b"a b",
        "README.md": b"# qwen",
    },
    "google/byt5-small": {
        "config.json": b"{}",
        "special_tokens_map.json": b"{}",
        "tokenizer_config.json": b"{}",
        "pytorch_model.bin": b"b" * 3000,
        "flax_model.msgpack": b"f" * 3000,
    },
    "hunyuanvideo-community/HunyuanImage-2.1-Diffusers": {
        "text_encoder_2/config.json": b"{}",
        "text_encoder_2/model.safetensors": b"g" * 4000,
        "tokenizer_2/tokenizer_config.json": b"{}",
        "tokenizer_2/added_tokens.json": b"{}",
        "transformer/diffusion_pytorch_model.safetensors": b"t" * 4000,
        "model_index.json": b"{}",
    },
    "PromptEnhancer/PromptEnhancer-32B": {
        "config.json": b"{}",
        "model-00001-of-00001.safetensors": b"e" * 5000,
    },
}


def is_lfs(path: str) -> bool:
    return not path.endswith((".json", ".txt", ".md", ".gitattributes"))


class FakeHub:
    """Serves `repos` (default REPOS); can cut one file's transfer short or serve wrong bytes for one file."""

    def __init__(self, repos: dict[str, dict[str, bytes]] | None = None) -> None:
        self.repos = REPOS if repos is None else repos
        self.requests: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}
        self.corrupt: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                hub.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def listing(self, repo: str) -> bytes:
        siblings = []
        for path, data in self.repos[repo].items():
            entry = {"rfilename": path, "size": len(data)}
            if is_lfs(path):
                entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 130}
                entry["blobId"] = "0" * 40
            else:
                entry["blobId"] = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
            siblings.append(entry)
        return json.dumps({"id": repo, "sha": COMMIT, "private": False, "siblings": siblings}).encode()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?")[0]
        if match := re.fullmatch(r"/api/models/(.+?)(?:/revision/[^/]+)?", path):
            body = self.listing(match[1])
            request.send_response(200)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)
            return
        match = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", path)
        if match is None or match[2] != COMMIT:
            request.send_error(404)
            return
        repo, name = match[1], match[3]
        data = self.repos[repo][name]
        if name in self.corrupt:
            data = bytes(len(data))
        range_header = request.headers.get("Range")
        self.requests.append((name, range_header))
        start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1]) if range_header else 0
        request.send_response(206 if start else 200)
        request.send_header("Content-Length", str(len(data) - start))
        request.end_headers()
        if name in self.cut:
            request.wfile.write(data[start : self.cut.pop(name)])
            request.wfile.flush()
            request.close_connection = True
            request.connection.shutdown(socket.SHUT_RDWR)
            return
        request.wfile.write(data[start:])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


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
    assert download(config, tmp_path, endpoint=hub.endpoint, progress=False) == []
    assert hub.requests == []  # everything present: nothing fetched twice


def test_distilled_fp8_with_reprompt_configurations(hub: FakeHub, tmp_path: Path) -> None:
    config = DownloadConfig(variant="hunyuanimage-v2.1-distilled", fp8=True, refiner=False, reprompt="7b")
    files = list_files(config, tmp_path, endpoint=hub.endpoint)
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
    files = list_files(big, tmp_path, endpoint=hub.endpoint)
    names = {f.destination.relative_to(tmp_path).as_posix() for f in files}
    assert names == {
        "dit/hunyuanimage2.1.safetensors",
        "vae/vae_2_1/config.json",
        "vae/vae_2_1/pytorch_model.ckpt",
        "reprompt_32b/config.json",
        "reprompt_32b/model-00001-of-00001.safetensors",
    }


def test_interrupted_transfer_resumes(hub: FakeHub, tmp_path: Path) -> None:
    config = DownloadConfig(
        variant="hunyuanimage-v2.1-distilled", fp8=True, refiner=False, text_encoder=False, glyph=False
    )
    name = "dit/hunyuanimage2.1-distilled_fp8.safetensors"
    full = REPOS["tencent/HunyuanImage-2.1"][name]
    hub.cut[name] = 1000
    with pytest.raises(DownloadError, match="run the command again to resume"):
        download(config, tmp_path, endpoint=hub.endpoint, progress=False)
    partial = tmp_path / (name + ".incomplete")
    assert partial.stat().st_size == 1000
    assert not (tmp_path / name).exists()

    hub.requests.clear()
    download(config, tmp_path, endpoint=hub.endpoint, progress=False)
    assert (name, "bytes=1000-") in hub.requests  # only the missing bytes were asked for
    assert (tmp_path / name).read_bytes() == full
    assert not partial.exists()


def test_corrupt_file_is_refused_and_deleted(hub: FakeHub, tmp_path: Path) -> None:
    config = DownloadConfig(refiner=False, text_encoder=False, glyph=False)
    hub.corrupt.add("vae/vae_2_1/pytorch_model.ckpt")
    with pytest.raises(DownloadError, match="pytorch_model.ckpt .*corrupt"):
        download(config, tmp_path, endpoint=hub.endpoint, progress=False)
    assert not (tmp_path / "vae/vae_2_1/pytorch_model.ckpt").exists()
    assert not (tmp_path / "vae/vae_2_1/pytorch_model.ckpt.incomplete").exists()


def test_unreachable_hub_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(HubUnreachableError, match=re.escape(endpoint) + ".*HF_ENDPOINT"):
        download(DownloadConfig(), tmp_path, endpoint=endpoint, progress=False)


def test_download_command_names_the_configuration() -> None:
    config = DownloadConfig(variant="hunyuanimage-v2.1-distilled", fp8=True, refiner=False, reprompt="32b")
    expected = "hyimage download --variant hunyuanimage-v2.1-distilled --fp8 --no-refiner --reprompt 32b"
    assert config.command() == expected
    with pytest.raises(ValueError, match="variant 'sdxl'"):
        DownloadConfig(variant="sdxl")
