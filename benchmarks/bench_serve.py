"""Requests per minute of `hyimage serve` with and without batching, on the tiny checkpoint tree (CPU).

One process, one loaded pipeline (distilled, no refiner), served over HTTP on 127.0.0.1 by uvicorn in a
thread; for each --max-batch setting, `--requests` compatible requests are sent at once (one image each,
own prompt and seed) and the wall time until the last answer gives requests per minute. The settings run
in the order 1, B, 1, B after a warm-up, and each figure is the better of its two runs.

    python benchmarks/bench_serve.py [--requests 16] [--size 128] [--steps 4] [--max-batch 8] [--threads 2]
"""

import argparse
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing


def serve(pipe, max_batch: int, queue: int):
    """(url, stop) of a server over a fresh worker with `max_batch`."""
    import uvicorn

    from hyimage.serving.app import create_app
    from hyimage.serving.validation import ServeLimits
    from hyimage.serving.worker import Worker
    from hyimage.variants import DISTILLED_DEFAULTS

    worker = Worker(pipe, max_queue=queue, max_batch=max_batch).start()
    limits = ServeLimits(model_id="hunyuanimage-v2.1-distilled", defaults=DISTILLED_DEFAULTS, refiner=False)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(worker, limits), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join()
        worker.stop()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", worker, stop


def run(pipe, max_batch: int, args: argparse.Namespace) -> tuple[float, int]:
    """Wall seconds for `args.requests` concurrent requests, and the number of pipeline calls."""
    import httpx

    url, worker, stop = serve(pipe, max_batch, args.requests)
    bodies = [{"prompt": f"request {i}: a red fox in the snow", "size": f"{args.size}x{args.size}",
               "steps": args.steps, "seed": i} for i in range(args.requests)]
    try:
        with ThreadPoolExecutor(args.requests) as pool:
            start = time.perf_counter()
            answers = list(pool.map(lambda b: httpx.post(f"{url}/v1/images/generations", json=b, timeout=600), bodies))
            elapsed = time.perf_counter() - start
    finally:
        stop()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:1]
    return elapsed, worker.stats.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from loguru import logger

    from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline
    from tests.fixtures.qwen_tokenizer import build_qwen_tokenizer_once
    from tests.fixtures.tiny_tree import write_tiny_tree

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tree = write_tiny_tree(Path(tmp) / "ckpts", build_qwen_tokenizer_once(tmp))
        pipe = HunyuanImagePipeline.from_pretrained(
            model_name="hunyuanimage-v2.1-distilled", model_root=tree, refiner=False, progress_bar=False
        )
        pipe(prompt="warm-up", width=args.size, height=args.size, num_inference_steps=1, seed=0)
        results: dict[int, list[tuple[float, int]]] = {1: [], args.max_batch: []}
        for max_batch in (1, args.max_batch, 1, args.max_batch):
            results[max_batch].append(run(pipe, max_batch, args))

    print(f"{args.requests} concurrent requests, {args.size}x{args.size}, {args.steps} steps, tiny distilled "
          f"tree, {args.threads} CPU threads")
    best = {}
    for max_batch, runs in results.items():
        elapsed, calls = min(runs)
        best[max_batch] = args.requests / elapsed * 60
        print(f"  --max-batch {max_batch:<3} {best[max_batch]:8.1f} requests/min  ({calls} pipeline calls, "
              f"runs: {', '.join(f'{e:.2f} s' for e, _ in runs)})")
    print(f"  batched / unbatched: {best[args.max_batch] / best[1]:.2f}x")


if __name__ == "__main__":
    main()
