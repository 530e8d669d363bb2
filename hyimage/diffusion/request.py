"""One check of a whole generation or refinement request, run before any model part is loaded.

`check_request` takes the arguments of `HunyuanImagePipeline.__call__`, of
`HunyuanImageRefinerPipeline.__call__` or of the CLI (by their Python names; `names` maps them to the
CLI's flags for messages) and raises `RequestError` naming the argument, the value and the fix. The
bounds keep a typo from allocating gigabytes or looping for hours: sides up to 4096 pixels (the 2K
models' presets are at most 2560), 1-1000 steps, at most 64 images per call.
"""

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from loguru import logger

from hyimage.errors import RequestError, RequestTypeError

MAX_SIDE = 4096
MAX_STEPS = 1000
MAX_IMAGES_PER_CALL = 64
SEED_LIMIT = 2**64
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
REFINER_HANDOFFS = ("uint8", "float")
CALLBACK_TENSOR_INPUTS = ("latents",)
EMBEDDING_NAMES = ("prompt_embeds", "negative_prompt_embeds", "glyph_embeds", "negative_glyph_embeds")
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


class _Namer:
    """Argument names as the caller knows them: `width` in Python, `--width` on the command line."""

    def __init__(self, names: Mapping[str, str] | None) -> None:
        self.names = dict(names or {})

    def __call__(self, name: str) -> str:
        return self.names.get(name, f"`{name}`")

    def error(self, name: str, message: str, kind: type[RequestError] = RequestError) -> RequestError:
        separator = "" if message.startswith(("=", "+")) else " "
        return kind(self.names.get(name, name), f"{self(name)}{separator}{message}")


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_int(
    name: str, value: Any, low: int, high: int, fix: str = "", namer: "_Namer | Mapping[str, str] | None" = None
) -> None:
    """`value` is an int in [low, high]; `namer` maps argument names to what the user typed."""
    namer = namer if isinstance(namer, _Namer) else _Namer(namer)
    _require_int(namer, name, value, fix)
    if not low <= value <= high:
        raise namer.error(name, f"must be between {low} and {high}, got {value}{fix}")


def _require_int(namer: _Namer, name: str, value: Any, fix: str = "") -> None:
    if not is_int(value):
        hint = f" such as {int(value)}" if is_real(value) and math.isfinite(value) and value == int(value) else ""
        raise namer.error(name, f"must be an int{hint}, got {value!r} ({_type_name(value)}){fix}", RequestTypeError)


def check_real(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    namer: "_Namer | Mapping[str, str] | None" = None,
) -> None:
    """`value` is a finite real number in [low, high] ((low, high] when `low_open`)."""
    namer = namer if isinstance(namer, _Namer) else _Namer(namer)
    if not is_real(value):
        raise namer.error(name, f"must be a number, got {value!r} ({_type_name(value)})", RequestTypeError)
    if not math.isfinite(value):
        raise namer.error(
            name, f"must be a finite number, got {value}; pass e.g. the variant's default (leave it unset)"
        )
    if value < low or (low_open and value == low) or value > high:
        bound = f"greater than {low}" if low_open else f"at least {low}"
        bound += "" if high == math.inf else f" and at most {high}"
        raise namer.error(name, f"must be {bound}, got {value}")


def nearest_side(value: int, multiple: int) -> int:
    """The valid width or height closest to `value`: a multiple of `multiple` in [multiple, MAX_SIDE]."""
    return min(MAX_SIDE // multiple * multiple, max(multiple, round(value / multiple) * multiple))


def check_side(name: str, value: Any, multiple: int, namer: _Namer, what: str = "VAE's downsampling factor") -> None:
    """A width or height: an int, a positive multiple of `multiple`, at most MAX_SIDE."""
    _require_int(namer, name, value)
    if value < multiple or value % multiple or value > MAX_SIDE:
        nearest = nearest_side(value, multiple)
        raise namer.error(
            name,
            f"={value} must be a multiple of {multiple} (the {what}) between {multiple} and {MAX_SIDE}; "
            f"e.g. {nearest}",
        )


def plain_seed(seed: Any) -> int | list[int] | None:
    """A checked seed as Python ints (a NumPy integer or a tuple of them passes the check too)."""
    if seed is None:
        return None
    return int(seed) if is_int(seed) else [int(s) for s in seed]


def check_device(device: Any, name: str = "device", names: Mapping[str, str] | None = None) -> torch.device:
    """The torch device named by `device`, which must exist on this machine."""
    namer = _Namer(names)
    if isinstance(device, torch.device):
        parsed = device
    elif isinstance(device, str):
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise namer.error(name, f"{device!r} is not a device; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    else:
        raise namer.error(
            name, f"must be a device name such as 'cuda' or 'cpu', got {_type_name(device)}", RequestTypeError
        )
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise namer.error(
                name,
                f"is {device!r} but CUDA is not available on this machine (torch "
                f"{torch.__version__}); use 'cpu', or install a CUDA build of torch",
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise namer.error(
                name, f"is {device!r} but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
            )
        return parsed
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise namer.error(name, f"is {device!r} but MPS is not available on this machine; use 'cpu'")
        return parsed
    backend = getattr(torch, parsed.type, None)
    if backend is not None and hasattr(backend, "is_available") and backend.is_available():
        return parsed
    raise namer.error(name, f"is {device!r}, which is not available here; use 'cpu' or 'cuda'")


def check_dtype(dtype: Any, name: str = "dtype") -> torch.dtype:
    """A floating torch dtype a pipeline can compute in (bf16, fp16, fp32; names as strings accepted)."""
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    if dtype in (torch.bfloat16, torch.float16, torch.float32):
        return dtype
    raise RequestError(name, f"`{name}`={dtype!r} is not supported; use torch.bfloat16, torch.float16 or torch.float32")


def closest_name(name: str, valid: Iterable[str]) -> str | None:
    """The valid name `name` is most likely a typo of (difflib's closest, at least half alike), or None."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return close[0] if close else None


def check_keywords(method: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Unknown keywords name the public method and the closest valid keyword."""
    valid = sorted(set(valid))
    for key in given:
        if key not in valid:
            close = closest_name(key, valid)
            hint = f"; did you mean {close!r}?" if close else f"; valid keywords: {', '.join(valid)}"
            raise RequestTypeError(key, f"{method}() got an unknown keyword argument {key!r}{hint}")


def _is_tensor_or_none(namer: _Namer, name: str, value: Any) -> None:
    if value is not None and not isinstance(value, torch.Tensor):
        raise namer.error(name, f"must be a torch.Tensor, got {_type_name(value)}", RequestTypeError)


def _check_embeds(namer: _Namer, name: str, embeds: Any, mask: Any) -> None:
    """An embedding tensor needs its mask, of matching batch and length."""
    _is_tensor_or_none(namer, name, embeds)
    _is_tensor_or_none(namer, name + "_mask", mask)
    if embeds is None:
        if mask is not None:
            raise namer.error(name + "_mask", f"was given without {namer(name)}; pass both or neither")
        return
    if mask is None:
        raise namer.error(
            name,
            f"was given without {namer(name + '_mask')}; pass the attention mask the encoder returned with it "
            "(1 for valid tokens, 0 for padding)",
        )
    if embeds.ndim != 3 or mask.ndim != 2 or mask.shape != embeds.shape[:2]:
        raise namer.error(
            name,
            f"must be (batch, length, dim) and {namer(name + '_mask')} (batch, length); got "
            f"{tuple(embeds.shape)} and {tuple(mask.shape)}",
        )


def _prompt_count(namer: _Namer, args: Mapping[str, Any], image_count: int | None) -> int:
    """How many prompts the request has (images for the refiner), checking prompt, negative prompt and embeddings."""
    prompt, embeds = args.get("prompt"), args.get("prompt_embeds")
    for name in EMBEDDING_NAMES:
        _check_embeds(namer, name, args.get(name), args.get(name + "_mask"))
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)):
        prompts = list(prompt)
        if not prompts:
            raise namer.error("prompt", "is an empty list; pass a string or a non-empty list of strings")
        bad = next((p for p in prompts if not isinstance(p, str)), None)
        if bad is not None:
            raise namer.error("prompt", f"must hold strings only, got {bad!r} ({_type_name(bad)})", RequestTypeError)
    elif prompt is None:
        prompts = None
    else:
        raise namer.error(
            "prompt", f"must be a string or a list of strings, got {_type_name(prompt)}", RequestTypeError
        )
    _check_encodable(namer, "prompt", prompts)
    if prompts is None and embeds is None:
        raise namer.error(
            "prompt", "is missing; pass a string, a list of strings, or `prompt_embeds` with `prompt_embeds_mask`"
        )
    if image_count is not None:
        n = image_count
        if prompts is not None and len(prompts) not in (1, n):
            raise namer.error(
                "prompt", f"has {len(prompts)} entries but {n} images were given; pass one per image or one"
            )
    elif prompts is not None:
        n = len(prompts)
    else:
        n = embeds.shape[0]
    if embeds is not None and prompts is not None and image_count is None and embeds.shape[0] != n:
        raise namer.error("prompt", f"has {n} entries but `prompt_embeds` has batch {embeds.shape[0]}")
    for name in EMBEDDING_NAMES:
        if args.get(name) is not None and args[name].shape[0] != n:
            raise namer.error(name, f"has batch {args[name].shape[0]} but there are {n} prompts")

    negative = args.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        if not isinstance(negative, (list, tuple)) or not all(isinstance(p, str) for p in negative):
            raise namer.error(
                "negative_prompt", f"must be a string or a list of strings, got {negative!r}", RequestTypeError
            )
        if len(negative) != n:
            raise namer.error(
                "negative_prompt",
                f"has {len(negative)} entries but there are {n} prompts; pass one per prompt or a single string",
            )
    _check_encodable(namer, "negative_prompt", [negative] if isinstance(negative, str) else negative)
    return n


def warn_empty_prompts(prompt: str | Sequence[str] | None) -> None:
    """Warn (not refuse: an unconditional image is a valid request) when a prompt is empty or only whitespace:
    the call runs for minutes with no text to draw."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    empty = [i for i, text in enumerate(prompts) if isinstance(text, str) and not text.strip()]
    if empty:
        which = "the prompt is" if len(prompts) == 1 else f"prompts {', '.join(str(i) for i in empty)} (from 0) are"
        logger.warning(f"{which} empty: the images take as long as any and have nothing to draw; pass a prompt")


def _check_encodable(namer: _Namer, name: str, texts: Sequence[str] | None) -> None:
    """Refuse text holding a lone surrogate (what Python makes of bytes that are not UTF-8, e.g. from a shell),
    which no tokenizer takes, naming the entry and the character position."""
    for entry, text in enumerate(texts or []):
        position = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
        if position is not None:
            where = f"entry {entry} " if len(texts) > 1 else ""
            raise namer.error(
                name,
                f"{where}holds an unpaired surrogate U+{ord(text[position]):04X} at character {position} (after "
                f"{text[max(0, position - 20):position]!r}): it is not valid text, usually bytes that are not UTF-8; "
                "pass the prompt as UTF-8",
            )


def _check_seeds(namer: _Namer, seed: Any, generator: Any, batch: int) -> None:
    if seed is not None and generator is not None:
        raise namer.error("seed", "and `generator` were both given; pass one of them")
    fix = "; pass an int in [0, 2**64), one per image, or None for a random seed"
    if isinstance(seed, (list, tuple)):
        for s in seed:
            check_int("seed", s, 0, SEED_LIMIT - 1, fix, namer)
        if len(seed) != batch:
            raise namer.error(
                "seed",
                f"is a list of {len(seed)} seeds but {batch} images are requested; pass one seed per image or one int",
            )
    elif seed is not None:
        if isinstance(seed, str):
            raise namer.error(
                "seed", f"is the string {seed!r}; pass an int (e.g. {seed.strip()[:20] or 42})", RequestTypeError
            )
        check_int("seed", seed, 0, SEED_LIMIT - 1, fix, namer)
        if seed + batch - 1 >= SEED_LIMIT:
            raise namer.error("seed", f"+ {batch - 1} (one seed per image) passes 2**64; pass a smaller seed")
    if generator is not None and not isinstance(generator, torch.Generator):
        if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
            raise namer.error("generator", "must be a torch.Generator or a list of them", RequestTypeError)
        if len(generator) != batch:
            raise namer.error(
                "generator",
                f"is a list of {len(generator)} generators but {batch} images are requested; pass "
                "one generator per image (prompts x num_images_per_prompt)",
            )


def _check_choice(namer: _Namer, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise namer.error(name, f"{value!r} is unknown; choose one of {', '.join(map(repr, choices))}")


def _check_flag(namer: _Namer, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise namer.error(name, f"must be True or False, got {value!r}", RequestTypeError)


def check_request(
    args: Mapping[str, Any],
    *,
    size_multiple: int = 32,
    aspect_ratios: Mapping[str, tuple[int, int]] | None = None,
    image_count: int | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Check the arguments of one call (absent or None ones take defaults later); raise `RequestError` on the first
    bad one.

    `image_count` is the number of input images of a refinement (None for generation); `names` maps Python
    argument names to the names the user typed (e.g. CLI flags).
    """
    namer = _Namer(names)
    present = {k: v for k, v in args.items() if v is not None}

    for flag in ("use_reprompt", "use_refiner", "return_dict"):
        if flag in present:
            _check_flag(namer, flag, present[flag])
    if "output_type" in present:
        _check_choice(namer, "output_type", present["output_type"], OUTPUT_TYPES)
    if "refiner_handoff" in present:
        _check_choice(namer, "refiner_handoff", present["refiner_handoff"], REFINER_HANDOFFS)
    for name in ("callback", "callback_on_step_end"):
        if name in present and not callable(present[name]):
            raise namer.error(name, f"must be callable, got {_type_name(present[name])}", RequestTypeError)
    if "callback_on_step_end_tensor_inputs" in present:
        inputs = present["callback_on_step_end_tensor_inputs"]
        if isinstance(inputs, str) or not all(i in CALLBACK_TENSOR_INPUTS for i in inputs):
            raise namer.error(
                "callback_on_step_end_tensor_inputs", f"={inputs!r}: only {list(CALLBACK_TENSOR_INPUTS)} can be passed"
            )

    # sizes
    if "aspect_ratio" in present:
        ratio = present["aspect_ratio"]
        if "width" in present or "height" in present:
            raise namer.error(
                "aspect_ratio", f"and {namer('width')}/{namer('height')} were both given; pass one of them"
            )
        if aspect_ratios is not None:
            _check_choice(namer, "aspect_ratio", ratio, list(aspect_ratios))
    for name in ("width", "height"):
        if name in present:
            check_side(name, present[name], size_multiple, namer)

    # sampling
    if "num_inference_steps" in present:
        check_int("num_inference_steps", present["num_inference_steps"], 1, MAX_STEPS, namer=namer)
    if "guidance_scale" in present:
        check_real("guidance_scale", present["guidance_scale"], 0.0, 1000.0, namer=namer)
    if "shift" in present:
        check_real("shift", present["shift"], 0.0, 1000.0, low_open=True, namer=namer)
    if "num_images_per_prompt" in present:
        check_int("num_images_per_prompt", present["num_images_per_prompt"], 1, MAX_IMAGES_PER_CALL, namer=namer)

    # prompts, images and seeds
    n = _prompt_count(namer, args, image_count)
    batch = n * present.get("num_images_per_prompt", 1)
    if batch > MAX_IMAGES_PER_CALL:
        raise namer.error(
            "num_images_per_prompt" if present.get("num_images_per_prompt", 1) > 1 else "prompt",
            f"asks for {batch} images in one call (at most {MAX_IMAGES_PER_CALL}); split the request into several "
            "calls",
        )
    _check_seeds(namer, present.get("seed"), present.get("generator"), batch)
    if "latents" in present:
        latents = present["latents"]
        _is_tensor_or_none(namer, "latents", latents)
        if latents.ndim not in (4, 5) or latents.shape[0] != batch:
            raise namer.error(
                "latents", f"must be (batch={batch}, channels, [1,] h, w), got shape {tuple(latents.shape)}"
            )
    text_only = "prompt" not in present
    if present.get("use_refiner") and text_only:
        raise namer.error(
            "use_refiner", "=True needs `prompt` text: the refiner encodes the prompt with its own template"
        )
    if present.get("use_reprompt") and text_only:
        raise namer.error("use_reprompt", "=True rewrites `prompt` text; it cannot rewrite precomputed `prompt_embeds`")


def refuse_unknown_keywords(method: str, signature_of: Callable, given: Mapping[str, Any]) -> None:
    """Raise for keywords `signature_of` does not take, naming `method` and the closest valid keyword."""
    valid = [p.name for p in inspect.signature(signature_of).parameters.values() if p.kind != p.VAR_KEYWORD]
    check_keywords(method, given, valid)
