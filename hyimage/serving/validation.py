"""The body of `POST /v1/images/generations` (OpenAI's images request plus our fields), checked field by field.

Every refusal is an `ApiError` whose `param` names the field, in OpenAI's error shape. Bounds follow the
pipeline's: sides a multiple of the VAE factor (32) up to 4096, 1-1000 steps; `n` up to the server's maximum.
"""

import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from hyimage.diffusion.request import MAX_IMAGES_PER_CALL, check_request
from hyimage.errors import RequestError
from hyimage.variants import SamplingDefaults

MAX_SIDE = 4096
MAX_STEPS = 1000
# The pipeline's argument names as this API names them, for the pipeline's own request check.
API_NAMES = {"width": "size", "height": "size", "num_inference_steps": "steps", "num_images_per_prompt": "n"}
MAX_PROMPT_CHARS = 32000
SEED_LIMIT = 2**64
# OpenAI's fields that do not change what this model draws: accepted and ignored.
IGNORED_FIELDS = ("user", "quality", "style", "moderation", "background")
OUR_FIELDS = ("negative_prompt", "seed", "steps", "guidance_scale", "shift", "use_refiner", "use_reprompt")
FIELDS = ("prompt", "model", "n", "size", "response_format", "output_format", "stream", *OUR_FIELDS, *IGNORED_FIELDS)


class ApiError(Exception):
    """An error answered in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    """A 400 for the field `param`."""
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ServeLimits:
    """What the server serves and allows: the model id, its sampling defaults, sizes, the largest `n`."""

    model_id: str
    defaults: SamplingDefaults
    refiner: bool = True
    default_size: tuple[int, int] = (2048, 2048)
    size_multiple: int = 32
    max_n: int = 4
    loras: tuple[tuple[str, float], ...] = ()
    """The LoRAs every request runs with (file name, scale), fixed at server start."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_n <= MAX_IMAGES_PER_CALL:
            raise ValueError(f"max_n must be between 1 and {MAX_IMAGES_PER_CALL}, got {self.max_n}")


@dataclass(frozen=True)
class GenerationRequest:
    """One checked request with every default filled in; image i gets seed `seed + i`."""

    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    shift: float
    seed: int
    use_refiner: bool
    use_reprompt: bool
    stream: bool = False

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (prompts, negatives and seeds stay per image)."""
        return (self.width, self.height, self.steps, self.guidance_scale, self.shift, self.use_refiner,
                self.use_reprompt)


def _int(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(name, f"`{name}` must be an integer, got {value!r}", "invalid_type")
    if not low <= value <= high:
        raise bad(name, f"`{name}` must be between {low} and {high}, got {value}")
    return value


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise bad(name, f"`{name}` must be a finite number, got {value!r}", "invalid_type")
    if value < low or (low_open and value == low) or value > high:
        raise bad(name, f"`{name}` must be {'above' if low_open else 'at least'} {low} and at most {high}, got {value}")
    return float(value)


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"`{name}` must be true or false, got {value!r}", "invalid_type")
    return value


def _text(body: dict, name: str, required: bool) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise bad(name, f"`{name}` must be a non-empty string" if required else f"`{name}` must be a string",
                  "missing" if value is None else "invalid_type")
    if len(value) > MAX_PROMPT_CHARS:
        raise bad(name, f"`{name}` has {len(value)} characters; at most {MAX_PROMPT_CHARS}")
    return value


def parse_size(value: Any, limits: ServeLimits) -> tuple[int, int]:
    """"WxH" (or "auto" / absent for the default) with both sides multiples of the VAE factor within bounds."""
    if value is None or value == "auto":
        return limits.default_size
    match = re.fullmatch(r"(\d+)x(\d+)", value) if isinstance(value, str) else None
    if match is None:
        raise bad("size", f"`size` must be a string \"WIDTHxHEIGHT\" such as \"2048x2048\", got {value!r}")
    width, height = int(match[1]), int(match[2])
    m = limits.size_multiple
    for side in (width, height):
        if side < m or side % m or side > MAX_SIDE:
            nearest = min(MAX_SIDE, max(m, round(side / m) * m))
            raise bad("size", f"`size` {value!r}: each side must be a multiple of {m} (the VAE's downsampling "
                              f"factor) between {m} and {MAX_SIDE}; e.g. {nearest} instead of {side}")
    return width, height


def parse_generation_request(body: Any, limits: ServeLimits) -> GenerationRequest:
    """Check a decoded JSON body; raise `ApiError` (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object such as {\"prompt\": \"a red fox\"}", "invalid_json")
    unknown = [key for key in body if key not in FIELDS]
    if unknown:
        raise bad(unknown[0], f"unknown field `{unknown[0]}`; the fields are {', '.join(FIELDS)}", "unknown_parameter")
    prompt = _text(body, "prompt", required=True)
    model = body.get("model")
    if model is not None and model != limits.model_id:
        raise bad("model", f"`model` {model!r} is not served here; this server serves {limits.model_id!r}",
                  "model_not_found")
    response_format = body.get("response_format", "b64_json")
    if response_format != "b64_json":
        raise bad("response_format", f"`response_format` {response_format!r} is not supported; use \"b64_json\" "
                                     "(the images are returned in the response, never stored)")
    if body.get("output_format", "png") != "png":
        raise bad("output_format", f"`output_format` {body['output_format']!r} is not supported; use \"png\"")
    n = _int(body, "n", 1, limits.max_n)
    width, height = parse_size(body.get("size"), limits)
    steps = _int(body, "steps", 1, MAX_STEPS)
    guidance_scale = _number(body, "guidance_scale", 0.0, 1000.0)
    shift = _number(body, "shift", 0.0, 1000.0, low_open=True)
    n = 1 if n is None else n
    seed = _int(body, "seed", 0, SEED_LIMIT - n)
    use_refiner = _flag(body, "use_refiner", limits.refiner)
    if use_refiner and not limits.refiner:
        raise bad("use_refiner", "`use_refiner` is true but this server was started with --no-refiner")
    defaults = limits.defaults
    request = GenerationRequest(
        prompt=prompt,
        negative_prompt=_text(body, "negative_prompt", required=False),
        n=n,
        width=width,
        height=height,
        steps=defaults.num_inference_steps if steps is None else steps,
        guidance_scale=defaults.guidance_scale if guidance_scale is None else guidance_scale,
        shift=float(defaults.shift) if shift is None else shift,
        seed=secrets.randbelow(2**31) if seed is None else seed,
        use_refiner=use_refiner,
        use_reprompt=_flag(body, "use_reprompt", False),
        stream=_flag(body, "stream", False),
    )
    check_pipeline_arguments(request, limits.size_multiple)
    return request


def check_pipeline_arguments(request: GenerationRequest, size_multiple: int) -> None:
    """The pipeline's own request check on the arguments the worker will pass (a 400 naming our field)."""
    try:
        check_request(
            {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "width": request.width,
             "height": request.height, "num_inference_steps": request.steps, "guidance_scale": request.guidance_scale,
             "shift": request.shift, "num_images_per_prompt": request.n, "seed": request.seed,
             "use_refiner": request.use_refiner, "use_reprompt": request.use_reprompt},
            size_multiple=size_multiple,
            names=API_NAMES,
        )
    except RequestError as error:
        raise bad(error.argument, str(error)) from None
