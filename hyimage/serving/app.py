"""The FastAPI application: the page, the OpenAI-compatible images API, /v1/models and /health.

`POST /v1/images/generations` answers OpenAI's images response (`created`, `data` of `b64_json` with
`revised_prompt`, plus our `seed`); with `"stream": true` it answers server-sent events instead: `queued`
(queue position), `progress` (stage, step i of n), one `image_generation.completed` per image (OpenAI's
event name, with `b64_json`), or `error`. A client that disconnects has its request cancelled.
Server-sent events are written as the two lines the format needs (Starlette's StreamingResponse), which
needs no extra package.
"""

import asyncio
import base64
import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException

from hyimage.errors import RequestError
from hyimage.serving.options import check_api_key
from hyimage.serving.validation import ApiError, GenerationRequest, ServeLimits, parse_generation_request
from hyimage.serving.worker import GeneratedImage, Job, QueueFull, Worker


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def as_api_error(error: BaseException) -> ApiError:
    """A job's failure as an answer: the pipeline's argument checks are 400s naming the field; anything else a 500
    that says what failed without the server's paths or a traceback (logged in full with an id the answer gives)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, RequestError):
        return ApiError(400, public_text(str(error)), param=error.argument)
    reference = secrets.token_hex(4)
    logger.opt(exception=error).error(f"request failed (error {reference}): {type(error).__name__}: {error}")
    lines = str(error).strip().splitlines()
    what = f": {public_text(lines[0], relative=True)}" if lines else ""
    return ApiError(500, f"the server could not draw this request ({type(error).__name__}{what}); the server's log has "
                         f"the details under error {reference}", type="server_error", code="generation_failed")


def public_text(text: str, relative: bool = False) -> str:
    """`text` for a client: every absolute file path (and with `relative`, every word with a path separator that is
    not a URL) cut to its last component: `/srv/ckpts/x/config.json` -> `config.json`."""
    text = ABSOLUTE_PATH.sub(lambda match: match["name"], text)
    return RELATIVE_PATH.sub(lambda match: match["name"], text) if relative else text


ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])(?:~|[A-Za-z]:|\.{1,2})?(?:[/\\][^\s/\\'\"`]+)*[/\\](?P<name>[^\s/\\'\"`]+)")
RELATIVE_PATH = re.compile(r"(?<![\w:/.])(?![a-z]+://)(?:[^\s/\\'\"`]+[/\\])+(?P<name>[^\s/\\'\"`]+)")
MAX_BODY_BYTES = 1 << 20
"""The largest request body: two prompts of MAX_PROMPT_CHARS at six bytes each (JSON escapes) fit three times over."""


async def read_json(request: Request) -> Any:
    """The request body as JSON: at most MAX_BODY_BYTES (413), valid JSON of bounded depth (400)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body has {declared} bytes; at most {MAX_BODY_BYTES}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="body_too_large")
    try:
        return json.loads(bytes(body))
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply; send a flat JSON object such as "
                            "{\"prompt\": \"a red fox\"}", code="invalid_json") from None
    except ValueError:  # not JSON, not UTF-8, or an integer of more digits than Python converts
        raise ApiError(400, "the request body is not valid JSON; send a JSON object such as "
                            "{\"prompt\": \"a red fox\"}", code="invalid_json") from None


def image_entry(image: GeneratedImage) -> dict:
    return {"b64_json": base64.b64encode(image.png).decode("ascii"), "revised_prompt": image.revised_prompt,
            "seed": image.seed}


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def page_config(limits: ServeLimits, api_key_required: bool, aspect_ratios: dict[str, tuple[int, int]]) -> dict:
    """What the page needs to fill its form: the model, defaults, sizes and bounds."""
    d = limits.defaults
    return {
        "model": limits.model_id,
        "defaults": {"steps": d.num_inference_steps, "guidance_scale": d.guidance_scale, "shift": d.shift,
                     "size": f"{limits.default_size[0]}x{limits.default_size[1]}", "use_refiner": limits.refiner},
        "refiner": limits.refiner,
        "max_n": limits.max_n,
        "size_multiple": limits.size_multiple,
        "aspect_ratios": {name: f"{w}x{h}" for name, (w, h) in aspect_ratios.items()},
        "api_key_required": api_key_required,
    }


def lora_list(limits: ServeLimits) -> list[dict]:
    """The LoRAs the server runs every request with: file name and scale (not the server's paths)."""
    return [{"file": name, "scale": scale} for name, scale in limits.loras]


def create_app(
    worker: Worker, limits: ServeLimits, *, api_key: str | None = None, aspect_ratios: dict | None = None
) -> FastAPI:
    """The application over a started `worker`."""
    api_key = check_api_key(api_key)
    app = FastAPI(title="hyimage serve", docs_url=None, redoc_url=None, openapi_url=None)
    config = page_config(limits, api_key is not None, aspect_ratios or {})
    page = resources.files("hyimage.serving").joinpath("page.html").read_text(encoding="utf-8")
    page = page.replace("/*CONFIG*/null", json.dumps(config))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(error.status_code, str(error.detail), code="not_found"
                                       if error.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, public_text(str(error))))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        return error_response(as_api_error(error))

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or not secrets.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "this server needs an API key: send the header `Authorization: Bearer KEY` with "
                                "the key the server was started with (--api-key)", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        s = worker.stats
        return {"status": "ok", "model": limits.model_id, "queued": worker.pending, "running": worker.running,
                "completed": s.completed, "failed": s.failed, "cancelled": s.cancelled, "calls": s.calls,
                "largest_batch": s.largest_batch, "loras": lora_list(limits)}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list",
                "data": [{"id": limits.model_id, "object": "model", "created": 0, "owned_by": "tencent",
                          "loras": lora_list(limits)}]}

    @v1.post("/images/generations")
    async def generations(request: Request) -> Any:
        parsed = parse_generation_request(await read_json(request), limits)
        job = Job(parsed)
        events = job.listen() if parsed.stream else None
        try:
            worker.submit(job)
        except QueueFull as full:
            raise ApiError(429, str(full), type="rate_limit_error", code="queue_full") from None
        if events is not None:
            return StreamingResponse(stream(worker, job, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await answer(request, worker, job)

    app.include_router(v1)
    return app


async def answer(request: Request, worker: Worker, job: Job) -> Any:
    """The images of `job` as OpenAI's response, cancelling the job if the client disconnects first."""
    result = asyncio.wrap_future(job.future)
    disconnected = asyncio.ensure_future(wait_for_disconnect(request))
    await asyncio.wait({result, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if not result.done():  # nobody is left to answer; the job ends (cancelled, or done if it was finishing)
        worker.cancel(job)
        with contextlib.suppress(Exception):
            await result
        return JSONResponse({}, status_code=499)
    disconnected.cancel()
    error = result.exception()
    if error is not None:
        return error_response(as_api_error(error))
    return {"created": job.created, "data": [image_entry(image) for image in result.result()],
            "size": job.request.size, "output_format": "png"}


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def stream(worker: Worker, job: Job, events: asyncio.Queue) -> AsyncIterator[str]:
    """Server-sent events of `job` until its images or its error; cancelled if the client goes away."""
    request: GenerationRequest = job.request
    try:
        while True:
            event = await events.get()
            kind = event["type"]
            if kind == "done":
                for index, image in enumerate(event["images"]):
                    data = dict(image_entry(image), type="image_generation.completed", index=index,
                                created_at=job.created, size=request.size, output_format="png")
                    yield sse("image_generation.completed", data)
                return
            if kind == "error":
                yield sse("error", as_api_error(event["error"]).body())
                return
            yield sse(kind, event)
    finally:
        worker.cancel(job)
