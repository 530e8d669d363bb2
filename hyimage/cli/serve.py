"""The `hyimage serve` subcommand: its arguments and its runner (FastAPI and uvicorn are imported only here)."""

import argparse
import os
import socket

from loguru import logger

from hyimage.checkpoints.needs import DownloadConfig
from hyimage.cli.download import fetch
from hyimage.cli.options import (
    add_loading_arguments,
    add_lora_argument,
    check_loading_arguments,
    load_loras,
    lora_arguments,
    pipeline_from_args,
)
from hyimage.serving.validation import ServeLimits
from hyimage.serving.worker import Worker
from hyimage.variants import ASPECT_RATIOS, BASE_DEFAULTS, DISTILLED_DEFAULTS, VARIANT_ALIASES

API_KEY_ENV = "HYIMAGE_API_KEY"


def add_serve_parser(
    commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser] | None = None
) -> argparse.ArgumentParser:
    """Register `serve` on the console script's subcommands (`parents`: the options every subcommand takes)."""
    serve = commands.add_parser("serve", help="a web page and an OpenAI-compatible images API over one loaded model",
                                parents=parents or [])
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    serve.add_argument("--port", type=int, default=7860, help="default 7860; 0 picks a free port (printed)")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require `Authorization: Bearer KEY` on /v1/ (default ${API_KEY_ENV} if set)")
    serve.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 429 (default 16)")
    serve.add_argument("--max-batch", type=int, default=1,
                       help="images of compatible requests run in one pipeline call (default 1: no batching, "
                            "bit-exact images; more trades float rounding for throughput)")
    serve.add_argument("--max-n", type=int, default=4, help="the largest `n` (images per request), default 4")
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
    try:  # deferred: FastAPI and uvicorn are the optional extra hyimage[serve]; only this subcommand needs them
        import uvicorn

        from hyimage.serving.app import create_app
    except ImportError as missing:
        raise ValueError(
            f"hyimage serve needs FastAPI and uvicorn ({missing.name} is not installed); "
            "install them with: pip install 'hyimage[serve]'"
        ) from None
    for name in ("max_queue", "max_batch", "max_n"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    variant = VARIANT_ALIASES[args.variant]
    device = check_loading_arguments(args)
    loras = lora_arguments(args.lora)
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
    worker = Worker(pipe, max_queue=args.max_queue, max_batch=args.max_batch,
                    settings={"model": variant, "variant": variant, "fp8": args.fp8, "lora": args.lora}).start()
    app = create_app(worker, limits, api_key=args.api_key, aspect_ratios=ASPECT_RATIOS)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.create_server((args.host, args.port), family=family)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    if args.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
        logger.warning(f"serving on {host} without --api-key: anyone who can reach this port can use the GPU")
    print(f"hyimage serve: {variant} at http://{shown}:{port}/ (API: http://{shown}:{port}/v1/images/generations)",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="debug" if getattr(args, "verbose", False) else "info"))
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
    return 0
