"""`hyimage serve` against hostile and careless input: an empty API key refused at start, every bad request a 4xx in
OpenAI's shape, no answer or PNG chunk carrying a server path, a key or a traceback, startup options checked like
the CLI's. The app runs over a stub pipeline in this process (FastAPI's TestClient: no socket, nothing loaded)."""

import base64
import io
import json
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="hyimage serve needs the serve extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from hyimage.cli import main  # noqa: E402
from hyimage.errors import (
    CheckpointError,  # noqa: E402
    RequestError,
)
from hyimage.serving.app import MAX_BODY_BYTES, create_app  # noqa: E402
from hyimage.serving.options import check_api_key  # noqa: E402
from hyimage.serving.validation import ServeLimits  # noqa: E402
from hyimage.serving.worker import Worker  # noqa: E402
from hyimage.variants import DISTILLED_DEFAULTS  # noqa: E402

SECRET_ROOT = "/srv/secret-models/ckpts"
KEY = "s3cret-key"


@dataclass
class StubResult:
    images: torch.Tensor
    prompts: list[str]
    seeds: list[int]


class StubPipe:
    """Answers a gray image per prompt, or raises `failure` (a server-side error quoting a server path)."""

    failure: Exception | None = None

    def __call__(self, *, prompt, width, height, seed, **_: object) -> StubResult:
        if self.failure is not None:
            raise self.failure
        return StubResult(torch.full((len(prompt), 3, height, width), 0.5), list(prompt), list(seed))


@pytest.fixture
def served():
    pipe = StubPipe()
    worker = Worker(pipe, settings={"variant": "v", "lora": ["style.safetensors:0.5"]}).start()
    limits = ServeLimits(model_id="v", defaults=DISTILLED_DEFAULTS, refiner=False)
    try:
        yield pipe, TestClient(create_app(worker, limits, api_key=KEY), raise_server_exceptions=False)
    finally:
        worker.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param and param in error["message"]
    for leak in (SECRET_ROOT, KEY, "Traceback", 'File "'):
        assert leak not in response.text
    return error


# The API key.
@pytest.mark.parametrize("key", ["", "   ", " padded ", "tab\tkey", "clé"])
def test_an_empty_or_unsendable_key_is_refused(key: str) -> None:
    with pytest.raises(RequestError, match="--api-key") as error:
        check_api_key(key)
    assert "HYIMAGE_API_KEY" in str(error.value)
    with pytest.raises(ValueError, match="--api-key"):
        create_app(Worker(StubPipe()), ServeLimits(model_id="v", defaults=DISTILLED_DEFAULTS), api_key=key)


def test_serve_refuses_an_empty_key_from_the_flag_or_the_environment(monkeypatch, capsys, tmp_path: Path) -> None:
    root = ["--model-root", str(tmp_path / "absent")]
    assert main(["serve", *root, "--api-key", ""]) == 1
    assert "--api-key" in capsys.readouterr().err
    monkeypatch.setenv("HYIMAGE_API_KEY", "")
    assert main(["serve", *root]) == 1
    err = capsys.readouterr().err
    assert "HYIMAGE_API_KEY" in err and "Traceback" not in err


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Bearer    ", "", "Basic " + KEY, KEY, "Bearer wrong",
                                    f"Bearer {KEY}x"])
def test_a_bare_or_wrong_bearer_never_authenticates(served, header: str) -> None:
    _, client = served
    response = client.get("/v1/models", headers={"Authorization": header} if header else {})
    assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers=AUTH).status_code == 200


# Request bodies.
HOSTILE_BODIES = {
    "deeply nested": ("[" * 100_000 + "]" * 100_000, 400),
    "nested object": ('{"prompt": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}", 400),
    "not utf-8": (b'{"prompt": "\xff\xfe"}', 400),
    "huge integer": ('{"prompt": "x", "seed": ' + "9" * 5000 + "}", 400),
    "nan seed": ('{"prompt": "x", "seed": NaN}', 400),
    "infinite guidance": ('{"prompt": "x", "guidance_scale": Infinity}', 400),
    "a list": ('["prompt"]', 400),
    "empty": ("", 400),
    "too large": ('{"prompt": "' + "x" * MAX_BODY_BYTES + '"}', 413),
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_hostile_bodies_are_4xx_in_openai_shape(served, name: str) -> None:
    body, status = HOSTILE_BODIES[name]
    _, client = served
    response = client.post("/v1/images/generations", content=body, headers=dict(AUTH, **{"Content-Type":
                                                                                         "application/json"}))
    assert_openai_error(response, status)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n": 10**30}, "n"), ({"prompt": "x", "size": "64x64x64"}, "size"),
    ({"prompt": "x", "steps": 1.5}, "steps"), ({"prompt": ["x"]}, "prompt"), ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "shift": 0}, "shift"), ({"prompt": "x", "stream": "yes"}, "stream"),
])
def test_bad_fields_are_400_naming_the_field(served, body: dict, param: str) -> None:
    _, client = served
    assert_openai_error(client.post("/v1/images/generations", json=body, headers=AUTH), 400, param)


def test_unknown_routes_and_methods_answer_in_openai_shape(served) -> None:
    _, client = served
    assert_openai_error(client.get("/v1/nothing", headers=AUTH), 404)
    assert_openai_error(client.get("/v1/images/generations", headers=AUTH), 405)


def test_a_server_side_failure_is_a_500_without_paths(served) -> None:
    pipe, client = served
    pipe.failure = CheckpointError(f"{SECRET_ROOT}/reprompt_32b/config.json does not exist; run hyimage download "
                                   "--reprompt 32b\nTraceback (most recent call last): ...")
    response = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"}, headers=AUTH)
    error = assert_openai_error(response, 500)
    assert error["type"] == "server_error" and "config.json" in error["message"] and "error " in error["message"]
    pipe.failure = RuntimeError(f"CUDA error in {SECRET_ROOT}/kernels.py")
    stream = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "stream": True},
                         headers=AUTH)
    assert stream.status_code == 200 and "event: error" in stream.text
    for leak in (SECRET_ROOT, "Traceback"):
        assert leak not in stream.text
    pipe.failure = None
    assert client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"}, headers=AUTH).status_code == 200


def test_an_unexpected_error_in_a_route_is_a_500_in_openai_shape(served, monkeypatch) -> None:
    import hyimage.serving.app

    _, client = served

    def broken(body, limits):
        raise KeyError(f"{SECRET_ROOT}/state")

    monkeypatch.setattr(hyimage.serving.app, "parse_generation_request", broken)
    error = assert_openai_error(client.post("/v1/images/generations", json={"prompt": "x"}, headers=AUTH), 500)
    assert error["code"] == "generation_failed"


def test_png_chunks_name_loras_by_file_name_only(tmp_path: Path, monkeypatch) -> None:
    """`hyimage serve --lora /some/folder/style.safetensors:0.5`: the PNG's metadata says `style.safetensors:0.5`."""
    import uvicorn

    import hyimage.cli.serve
    import hyimage.serving.app

    lora = tmp_path / "private" / "style.safetensors"
    lora.parent.mkdir()
    lora.write_bytes(b"stub")  # only checked to exist: the stub pipeline attaches nothing

    class Loadable(StubPipe):
        def to(self, device):
            return self

        def load_lora_weights(self, path, scale):
            pass

    apps, answers = [], {}
    create = hyimage.serving.app.create_app
    monkeypatch.setattr(hyimage.serving.app, "create_app", lambda *a, **k: apps.append(create(*a, **k)) or apps[0])
    monkeypatch.setattr(hyimage.cli.serve, "pipeline_from_args", lambda *a, **k: Loadable())

    def one_request(server, sockets=None) -> None:
        body = {"prompt": "a fox", "size": "64x64", "steps": 1, "seed": 3}
        answers["image"] = TestClient(apps[0]).post("/v1/images/generations", json=body).json()

    monkeypatch.setattr(uvicorn.Server, "run", one_request)
    assert main(["serve", "--variant", "distilled", "--no-refiner", "--device", "cpu", "--port", "0",
                 "--model-root", str(tmp_path), "--lora", f"{lora}:0.5"]) == 0
    png = Image.open(io.BytesIO(base64.b64decode(answers["image"]["data"][0]["b64_json"])))
    assert json.loads(png.text["hyimage"])["lora"] == ["style.safetensors:0.5"]
    assert str(tmp_path) not in "".join(png.text.values())


# Startup options.
@pytest.mark.parametrize("option, value", [("--port", "70000"), ("--port", "-1"), ("--port", "http"),
                                           ("--max-n", "0"), ("--max-n", "1000"), ("--max-queue", "0"),
                                           ("--max-batch", "65"), ("--gpu-budget-gb", "nan")])
def test_startup_options_are_refused_with_their_name(option: str, value: str, capsys, tmp_path: Path) -> None:
    try:
        code = main(["serve", "--model-root", str(tmp_path), option, value])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (1, 2) and option in err and "Traceback" not in err


def test_a_port_in_use_is_named_before_anything_loads(tmp_path: Path, capsys, monkeypatch) -> None:
    import hyimage.cli.serve

    monkeypatch.setattr(hyimage.cli.serve, "pipeline_from_args", lambda *a, **k: pytest.fail("loaded"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model-root", str(tmp_path), "--device", "cpu", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert "--port" in err and str(port) in err and "Traceback" not in err
    assert main(["serve", "--model-root", str(tmp_path), "--device", "cpu", "--host", "no-such-host.invalid"]) == 1
    assert "--host" in capsys.readouterr().err
