"""The `hyimage serve` subcommand: its arguments and its runner (FastAPI and uvicorn are imported only here)."""

import argparse
import os
import socket

from loguru import logger

from hyimage.checkpoints.needs import DownloadConfig
from hyimage.cli.download import fetch
from hyimage.cli.numbers import integer
from hyimage.cli.options import (
    add_loading_arguments,
    add_lora_argument,
    check_loading_arguments,
    load_loras,
    lora_arguments,
    pipeline_from_args,
)
from hyimage.diffusion.request import MAX_IMAGES_PER_CALL
from hyimage.errors import RequestError
from hyimage.serving.options import API_KEY_ENV, check_api_key
from hyimage.serving.validation import ServeLimits
from hyimage.serving.worker import Worker
from hyimage.variants import ASPECT_RATIOS, BASE_DEFAULTS, DISTILLED_DEFAULTS, VARIANT_ALIASES

MAX_PORT = 65535
MAX_QUEUE = 10000


def add_serve_parser(
    commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser] | None = None
) -> argparse.ArgumentParser:
    """Register `serve` on the console script's subcommands (`parents`: the options every subcommand takes)."""
    serve = commands.add_parser("serve", help="a web page and an OpenAI-compatible images API over one loaded model",
                                parents=parents or [])
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    serve.add_argument("--port", type=integer(0, MAX_PORT), default=7860,
                       help="default 7860; 0 picks a free port (printed)")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require `Authorization: Bearer KEY` on /v1/ (default ${API_KEY_ENV} if set)")
    serve.add_argument("--max-queue", type=integer(1, MAX_QUEUE), default=16,
                       help="requests that may wait; more get 429 (default 16)")
    serve.add_argument("--max-batch", type=integer(1, MAX_IMAGES_PER_CALL), default=1,
                       help="images of compatible requests run in one pipeline call (default 1: no batching, "
                            "bit-exact images; more trades float rounding for throughput)")
    serve.add_argument("--max-n", type=integer(1, MAX_IMAGES_PER_CALL), default=4,
                       help="the largest `n` (images per request), default 4")
    serve.add_argument("--variant", default="base", choices=sorted(VARIANT_ALIASES),
                       help="base (50 steps, CFG) or distilled (8 steps); default base")
    serve.add_argument("--refiner", action=argparse.BooleanOptionalAction, default=True,
                       help="load the refiner and use it unless a request says use_refiner=false (default on)")
    serve.add_argument("--reprompt", choices=["7b", "32b"], default="32b",
                       help="the PromptEnhancer a request with use_reprompt=true loads (default 32b)")
    serve.add_argument("--trust-remote-code", action="store_true",
                       help="allow the 7B reprompt model's tokenizer code from its checkpoint folder to run")
    add_lora_argument(serve, note="; fixed at server start for every request (listed by /health and /v1/models)")
    add_loading_arguments(serve)
    serve.set_defaults(run=run_serve)
    return serve


def run_serve(args: argparse.Namespace) -> int:
    """Load the pipeline (parts on first use), start the worker, serve until interrupted."""
    api_key = check_api_key(args.api_key)
    try:  # deferred: FastAPI and uvicorn are the optional extra hyimage[serve]; only this subcommand needs them
        import uvicorn  # deferred: the optional extra hyimage[serve]

        from hyimage.serving.app import create_app  # deferred: imports FastAPI (hyimage[serve])
    except ImportError as missing:
        raise ValueError(
            f"hyimage serve needs FastAPI and uvicorn ({missing.name} is not installed); "
            "install them with `pip install -e '.[serve]'` in the hyimage checkout (or `pip install fastapi uvicorn`)"
        ) from None
    variant = VARIANT_ALIASES[args.variant]
    device = check_loading_arguments(args)
    loras = lora_arguments(args.lora)
    sock = listen(args.host, args.port)
    with sock:  # closed on the way out, whether the server ran or loading failed
        if args.download:
            fetch(DownloadConfig(variant=variant, fp8=args.fp8, refiner=args.refiner), args.model_root)
        pipe = pipeline_from_args(args, variant, args.reprompt, progress_bar=False)
        pipe.to(device)
        load_loras(pipe, loras)
        limits = ServeLimits(
            model_id=variant,
            defaults=DISTILLED_DEFAULTS if "distilled" in variant else BASE_DEFAULTS,
            refiner=args.refiner,
            max_n=args.max_n,
            loras=tuple((path.name, scale) for path, scale in loras),
        )
        # the PNGs' metadata names each LoRA by its file name and scale, never the server's path
        lora_names = [f"{path.name}:{scale:g}" for path, scale in loras]
        worker = Worker(pipe, max_queue=args.max_queue, max_batch=args.max_batch,
                        settings={"model": variant, "variant": variant, "fp8": args.fp8, "lora": lora_names}).start()
        app = create_app(worker, limits, api_key=api_key, aspect_ratios=ASPECT_RATIOS)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
        if api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
            logger.warning(f"serving on {host} without --api-key: anyone who can reach this port can use the GPU")
        print(f"hyimage serve: {variant} at http://{shown}:{port}/ (API: http://{shown}:{port}/v1/images/generations)",
              flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="debug" if getattr(args, "verbose", False) else "info"))
        try:
            server.run(sockets=[sock])
        finally:
            worker.stop()
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port`, opened before anything loads; a clear error naming the option."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise RequestError("--host", f"--host {host!r} is not an address of this machine ({error}); pass e.g. "
                                     "127.0.0.1 (this machine only) or 0.0.0.0 (the network)") from None
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise RequestError("--port", f"cannot listen on {host} port {port} ({error.strerror or error}); pass another "
                                     "--port (0 picks a free one) or stop what uses it") from None
