"""`hyimage serve` on the tiny tree, over HTTP on 127.0.0.1: a real server process for the API's behaviour, an
in-process server with a held worker for what depends on timing (batching, a full queue, a client leaving)."""

import asyncio
import base64
import io
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from hyimage.serving.validation import GenerationRequest
from hyimage.serving.worker import Job, Worker
from tests.fixtures.serve import (  # noqa: F401, F811 (fixtures used by name)
    API_KEY,
    VARIANT,
    InProcessServer,
    ServerProcess,
    inprocess_server,
    serve_tree,
    server_process,
    tiny_pipe,
)

httpx = pytest.importorskip("httpx")

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT = 120


def decode(entry: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(entry["b64_json"])))


def alone(pipe, prompt: str, seed: int, size: tuple[int, int] = (64, 64), steps: int = 2, n: int = 1,
          negative_prompt: str | None = None) -> list[np.ndarray]:
    """What the Python API draws for one request (uint8 arrays)."""
    out = pipe(prompt=prompt, negative_prompt=negative_prompt, width=size[0], height=size[1],
               num_inference_steps=steps, seed=seed, num_images_per_prompt=n, output_type="pil")
    images = [out] if n == 1 else out.images
    return [np.asarray(image) for image in images]


def post(url: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=TIMEOUT)


def sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


# The server process.
def test_round_trip_matches_the_python_api(server_process: ServerProcess, tiny_pipe) -> None:
    body = {"prompt": 'a shop sign that reads "OPEN"', "negative_prompt": "blurry", "n": 2, "size": "96x64",
            "steps": 2, "seed": 7, "model": VARIANT}
    response = post(server_process.url, body, AUTH)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert isinstance(answer["created"], int) and len(answer["data"]) == 2
    expected = alone(tiny_pipe, body["prompt"], 7, (96, 64), n=2, negative_prompt="blurry")
    for i, entry in enumerate(answer["data"]):
        image = decode(entry)
        assert image.format == "PNG" and image.size == (96, 64) and image.mode == "RGB"
        settings = json.loads(image.text["hyimage"])
        assert entry["seed"] == 7 + i and settings["seed"] == 7 + i
        assert settings["variant"] == VARIANT and settings["steps"] == 2 and settings["shift"] == 4
        assert settings["guidance_scale"] == 3.25 and settings["negative_prompt"] == "blurry"
        assert settings["prompt"] == body["prompt"] and entry["revised_prompt"] == body["prompt"]
        np.testing.assert_array_equal(np.asarray(image), expected[i])


def test_concurrent_requests_without_batching_give_exactly_their_images_alone(
    server_process: ServerProcess, tiny_pipe
) -> None:
    """The default --max-batch 1: concurrent requests are the same requests one at a time, bit for bit."""
    bodies = [{"prompt": f"a lighthouse, take {i}", "size": "64x64", "steps": 2, "seed": 40 + i} for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda body: post(server_process.url, body, AUTH), bodies))
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        served = np.asarray(decode(response.json()["data"][0]))
        np.testing.assert_array_equal(served, alone(tiny_pipe, body["prompt"], body["seed"])[0])


def test_openai_client_request_shape(server_process: ServerProcess) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server_process.url}/v1", api_key=API_KEY, timeout=TIMEOUT, max_retries=0)
    assert [m.id for m in client.models.list()] == [VARIANT]
    result = client.images.generate(model=VARIANT, prompt="a red fox", size="64x64", n=1,
                                    response_format="b64_json", extra_body={"steps": 1, "seed": 3})
    assert decode({"b64_json": result.data[0].b64_json}).size == (64, 64)
    with pytest.raises(openai.BadRequestError) as error:
        client.images.generate(prompt="a red fox", size="1000x1000")
    assert error.value.body["param"] == "size"


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({}, "prompt", "non-empty string"),
        ({"prompt": ""}, "prompt", "non-empty string"),
        ({"prompt": 3}, "prompt", "string"),
        ({"prompt": "x", "size": "65x64"}, "size", "multiple of 32"),
        ({"prompt": "x", "size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"prompt": "x", "size": "8192x64"}, "size", "4096"),
        ({"prompt": "x", "n": 0}, "n", "between 1 and 4"),
        ({"prompt": "x", "n": 5}, "n", "between 1 and 4"),
        ({"prompt": "x", "steps": "4"}, "steps", "integer"),
        ({"prompt": "x", "steps": 0}, "steps", "between 1"),
        ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale", "number"),
        ({"prompt": "x", "shift": 0}, "shift", "above 0"),
        ({"prompt": "x", "seed": -1}, "seed", "between 0"),
        ({"prompt": "x", "seed": 1.5}, "seed", "integer"),
        ({"prompt": "x", "response_format": "url"}, "response_format", "b64_json"),
        ({"prompt": "x", "model": "dall-e-3"}, "model", VARIANT),
        ({"prompt": "x", "use_refiner": True}, "use_refiner", "--no-refiner"),
        ({"prompt": "x", "use_reprompt": "yes"}, "use_reprompt", "true or false"),
        ({"prompt": "x", "colour": "red"}, "colour", "unknown field"),
    ],
)
def test_bad_input_is_400_naming_the_field(server_process: ServerProcess, body: dict, param: str, words: str) -> None:
    response = post(server_process.url, body, AUTH)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}


def test_malformed_json_is_400(server_process: ServerProcess) -> None:
    response = httpx.post(f"{server_process.url}/v1/images/generations", content=b"{prompt:", headers=AUTH)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert post(server_process.url, ["a list"], AUTH).status_code == 400


def test_api_key_is_required_on_v1_only(server_process: ServerProcess) -> None:
    url = server_process.url
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
        response = post(url, {"prompt": "x", "size": "64x64"}, headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"][0]["id"] == VARIANT
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    page = httpx.get(url)
    assert page.status_code == 200 and VARIANT in page.text and '"api_key_required": true' in page.text


def test_a_request_failing_in_the_pipeline_does_not_stop_the_server(server_process: ServerProcess) -> None:
    """use_reprompt on a tree without the reprompt model fails inside the pipeline, naming what to download."""
    response = post(server_process.url, {"prompt": "x", "size": "64x64", "steps": 1, "use_reprompt": True}, AUTH)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "reprompt" in error["message"]
    assert "hyimage download" in error["message"]
    again = post(server_process.url, {"prompt": "x", "size": "64x64", "steps": 1}, AUTH)
    assert again.status_code == 200 and decode(again.json()["data"][0]).size == (64, 64)
    assert server_process.process.poll() is None


# The in-process server with a held worker.
@pytest.fixture
def server(inprocess_server: InProcessServer):
    """The in-process server, its hook and queue bound restored after the test."""
    yield inprocess_server
    inprocess_server.worker.step_hook = None
    inprocess_server.worker.max_queue = 16


def test_concurrent_requests_are_batched_and_equal_their_unbatched_images(server: InProcessServer, tiny_pipe) -> None:
    """8 concurrent requests: the first runs alone, held until the 7 others wait; they then run as batches of 4
    and 3 (max_batch 4). Each image equals the one the request gives alone up to float rounding of the batched
    matrix products (at most one 8-bit level); the one that ran alone is bit-identical."""
    worker = server.worker
    before = worker.stats.calls
    held = threading.Event()

    def hold_first_call(jobs, step) -> None:
        if not held.is_set():
            held.set()
            assert worker.wait_for(lambda w: w.pending == 7, timeout=TIMEOUT)

    worker.step_hook = hold_first_call
    bodies = [{"prompt": f"prompt number {i}", "size": "64x64", "steps": 2, "seed": 100 + i} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(post, server.url, bodies[0])
        assert held.wait(TIMEOUT)
        rest = [pool.submit(post, server.url, body) for body in bodies[1:]]
        responses = [first.result()] + [f.result() for f in rest]
    assert [r.status_code for r in responses] == [200] * 8
    assert worker.stats.calls - before == 3 and worker.stats.largest_batch == 4

    for i, (body, response) in enumerate(zip(bodies, responses)):
        served = np.asarray(decode(response.json()["data"][0])).astype(int)
        expected = alone(tiny_pipe, body["prompt"], body["seed"])[0].astype(int)
        if i == 0:
            np.testing.assert_array_equal(served, expected)
        assert np.abs(served - expected).max() <= 1 and (served == expected).mean() > 0.99


def test_full_queue_answers_429(server: InProcessServer) -> None:
    worker = server.worker
    worker.max_queue = 1
    release = threading.Event()
    worker.step_hook = lambda jobs, step: release.wait(TIMEOUT)
    body = {"prompt": "x", "size": "64x64", "steps": 1}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, server.url, body)
        assert worker.wait_for(lambda w: w.running == 1 and w.pending == 0)
        waiting = pool.submit(post, server.url, dict(body, seed=1))
        assert worker.wait_for(lambda w: w.pending == 1)
        refused = post(server.url, dict(body, seed=2))
        release.set()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "queue_full" and "queue is full" in refused.json()["error"]["message"]


def raw_post(url: str, body: dict) -> socket.socket:
    """Send a POST on a socket of our own (to close it before the answer)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_a_client_that_disconnects_is_cancelled_and_the_server_goes_on(server: InProcessServer, tiny_pipe) -> None:
    """A blocker holds the worker until two compatible requests wait; they run as one batch, held at its first
    step until the server has cancelled the one whose client closed its connection. The other is run again
    and gets exactly its image alone; the next request works."""
    worker = server.worker
    cancelled_before = worker.stats.cancelled
    seen_cancel = threading.Event()

    def hook(jobs, step) -> None:
        prompts = [job.request.prompt for job in jobs]
        if prompts == ["blocker"]:
            assert worker.wait_for(lambda w: w.pending == 2, timeout=TIMEOUT)
        elif "leaves" in prompts and step == 0:
            leaving = jobs[prompts.index("leaves")]
            seen_cancel.set() if leaving.cancelled.wait(TIMEOUT) else None

    worker.step_hook = hook
    body = {"size": "64x64", "steps": 2}
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(post, server.url, dict(body, prompt="blocker", seed=1))
        assert worker.wait_for(lambda w: w.running == 1)
        leaving = raw_post(server.url, dict(body, prompt="leaves", seed=2))
        assert worker.wait_for(lambda w: w.pending == 1)
        staying = pool.submit(post, server.url, dict(body, prompt="stays", seed=3))
        assert worker.wait_for(lambda w: w.running == 2)  # "leaves" and "stays" in one call
        leaving.close()
        assert blocker.result().status_code == 200
        stayed = staying.result()
    assert seen_cancel.is_set() and worker.stats.cancelled == cancelled_before + 1
    assert stayed.status_code == 200
    served = np.asarray(decode(stayed.json()["data"][0]))
    np.testing.assert_array_equal(served, alone(tiny_pipe, "stays", 3)[0])
    assert post(server.url, dict(body, prompt="next", seed=4)).status_code == 200


def test_progress_is_streamed_and_a_closed_stream_is_cancelled(server: InProcessServer) -> None:
    worker = server.worker
    cancelled_before = worker.stats.cancelled
    body = {"prompt": "streamed", "size": "64x64", "steps": 3, "seed": 5, "n": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/images/generations", json=body, timeout=TIMEOUT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    steps = [e["step"] for e in events if e["type"] == "progress" and e.get("stage") == "denoise"]
    assert events[0] == {"type": "queued", "queue_position": 1} and steps == [1, 2, 3]
    completed = [e for e in events if e["type"] == "image_generation.completed"]
    assert [e["index"] for e in completed] == [0, 1] and [e["seed"] for e in completed] == [5, 6]
    assert decode(completed[1]).size == (64, 64)

    worker.step_hook = lambda jobs, step: jobs[0].cancelled.wait(TIMEOUT)
    with httpx.stream("POST", f"{server.url}/v1/images/generations", json=dict(body, prompt="leaves"),
                      timeout=TIMEOUT) as response:
        for line in response.iter_lines():
            if '"stage": "encode"' in line:
                break
    assert worker.wait_for(lambda w: w.running == 0 and w.stats.cancelled == cancelled_before + 1)
    worker.step_hook = None
    assert post(server.url, {"prompt": "next", "size": "64x64", "steps": 1}).status_code == 200


def test_a_queued_request_whose_client_leaves_frees_its_place(server: InProcessServer) -> None:
    worker = server.worker
    cancelled_before = worker.stats.cancelled
    release = threading.Event()
    worker.step_hook = lambda jobs, step: release.wait(TIMEOUT)
    body = {"prompt": "x", "size": "64x64", "steps": 1}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server.url, body)
        assert worker.wait_for(lambda w: w.running == 1)
        with httpx.stream("POST", f"{server.url}/v1/images/generations", json=dict(body, stream=True),
                          timeout=TIMEOUT) as response:
            assert next(response.iter_lines()) == "event: queued"
        assert worker.wait_for(lambda w: w.pending == 0 and w.stats.cancelled == cancelled_before + 1)
        release.set()
        assert running.result().status_code == 200


def test_refiner_stage_reports_its_steps(inprocess_server: InProcessServer, tiny_pipe) -> None:
    """A job with the refiner, on a worker of its own over the same pipeline (the server's worker is idle):
    progress per stage, the refiner's steps included."""
    request = GenerationRequest(prompt="a red fox", negative_prompt="", n=1, width=64, height=64, steps=2,
                                guidance_scale=3.25, shift=4.0, seed=1, use_refiner=True, use_reprompt=False)
    worker = Worker(tiny_pipe).start()

    async def events_of_one_job() -> list[dict]:
        job = Job(request)
        events = job.listen()
        worker.submit(job)
        seen = [await events.get()]
        while seen[-1]["type"] not in ("done", "error"):
            seen.append(await events.get())
        return seen

    try:
        seen = asyncio.run(events_of_one_job())
    finally:
        worker.stop()
    assert seen[-1]["type"] == "done", seen[-1]
    stages = [(e["stage"], e.get("step"), e.get("steps")) for e in seen if e["type"] == "progress"]
    assert stages == [("encode", None, None), ("denoise", 1, 2), ("denoise", 2, 2), ("decode", None, None)] + [
        ("refine", i, 4) for i in range(1, 5)]


@pytest.mark.slow
def test_lora_is_fixed_at_start_and_applied_as_generate_applies_it(serve_tree, tmp_path, monkeypatch) -> None:
    """`hyimage serve --lora FILE:0.5` (run in this process; the HTTP calls go through the app in place of uvicorn's
    loop): the image equals `hyimage generate`'s with the same LoRA, scale and seed, and differs from the image
    without it; /health and /v1/models list the LoRA by file name."""
    import uvicorn
    from fastapi.testclient import TestClient

    import hyimage.serving.app
    from hyimage.cli import main
    from tests.fixtures.tiny_tree import write_tiny_lora

    lora = write_tiny_lora(tmp_path / "style.safetensors")
    apps, answers = [], {}
    create_app = hyimage.serving.app.create_app
    monkeypatch.setattr(hyimage.serving.app, "create_app", lambda *a, **k: apps.append(create_app(*a, **k)) or apps[0])

    def serve_three_requests(server, sockets=None) -> None:
        client = TestClient(apps[0])
        answers["health"] = client.get("/health").json()
        answers["models"] = client.get("/v1/models").json()
        body = {"prompt": "a red fox", "size": "64x64", "steps": 1, "seed": 7}
        answers["image"] = client.post("/v1/images/generations", json=body).json()

    monkeypatch.setattr(uvicorn.Server, "run", serve_three_requests)
    options = ["--variant", "distilled", "--no-refiner", "--model-root", str(serve_tree), "--device", "cpu"]
    assert main(["serve", *options, "--port", "0", "--lora", f"{lora}:0.5"]) == 0
    assert answers["health"]["loras"] == [{"file": "style.safetensors", "scale": 0.5}]
    assert answers["models"]["data"][0]["loras"] == answers["health"]["loras"]
    served = np.asarray(decode(answers["image"]["data"][0]))

    generate = ["generate", "a red fox", *options, "--width", "64", "--height", "64", "--steps", "1", "--seed", "7"]
    assert main([*generate, "--lora", f"{lora}:0.5", "-o", str(tmp_path / "lora.png")]) == 0
    assert main([*generate, "-o", str(tmp_path / "plain.png")]) == 0
    np.testing.assert_array_equal(served, np.asarray(Image.open(tmp_path / "lora.png").convert("RGB")))
    assert not np.array_equal(served, np.asarray(Image.open(tmp_path / "plain.png").convert("RGB")))


def test_serve_refuses_a_bad_lora_before_loading(tmp_path, capsys) -> None:
    from hyimage.cli import main

    absent = tmp_path / "absent.safetensors"
    assert main(["serve", "--model-root", str(tmp_path / "no-ckpts"), "--lora", f"{absent}:0.5"]) == 1
    assert f"--lora {absent} does not exist" in capsys.readouterr().err
