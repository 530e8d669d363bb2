"""The `hyimage batch` subcommand: its arguments and its runner (the job itself is `hyimage.batch`)."""

import argparse
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.distributed as dist
from loguru import logger

from hyimage.batch import (
    RESULTS,
    SIZE_FACTOR,
    BatchLine,
    JobProgress,
    append_result,
    is_complete,
    lock_job_folder,
    read_prompts,
    read_results,
    remove_partial_files,
    resolve_jobs,
    sigterm_as_exit,
    write_png_atomic,
)
from hyimage.checkpoints.needs import DownloadConfig
from hyimage.cli.download import fetch
from hyimage.cli.numbers import integer, real, side
from hyimage.cli.options import (
    add_aspect_ratio_argument,
    add_loading_arguments,
    add_lora_argument,
    check_aspect_ratio,
    check_loading_arguments,
    default_device,
    load_loras,
    lora_arguments,
    pipeline_from_args,
)
from hyimage.diffusion.request import MAX_STEPS, SEED_LIMIT
from hyimage.parallel import add_parallel_argument
from hyimage.parallel.state import ParallelConfig, ParallelState, launched_by_torchrun
from hyimage.variants import BASE_DEFAULTS, DISTILLED_DEFAULTS, VARIANT_ALIASES


def add_batch_parser(commands: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Register `hyimage batch` on the CLI's subcommands."""
    batch = commands.add_parser(
        "batch", help="draw every prompt of a JSONL file into a folder (resumable; data-parallel under torchrun)",
        parents=list(parents),
    )
    batch.add_argument("prompts", type=Path, help="one JSON object per line: prompt, negative_prompt, seed, width, "
                                                  "height, steps, guidance_scale, name")
    batch.add_argument("--out", type=Path, required=True, help="folder for the images and results.jsonl")
    batch.add_argument("--negative-prompt", default=None, help="for lines without one")
    batch.add_argument("--variant", default="base", choices=sorted(VARIANT_ALIASES))
    size = batch.add_argument_group("size of lines without width/height (default 2048x2048)")
    size.add_argument("--width", type=side(SIZE_FACTOR))
    size.add_argument("--height", type=side(SIZE_FACTOR))
    add_aspect_ratio_argument(size)
    batch.add_argument("--steps", type=integer(1, MAX_STEPS),
                       help="for lines without steps; default: 50 base, 8 distilled")
    batch.add_argument("--guidance-scale", type=real(0.0, 1000.0),
                       help="for lines without one; default: 3.5 base, 3.25 distilled")
    batch.add_argument("--shift", type=real(0.0, 1000.0, low_open=True), help="default: 5 base, 4 distilled")
    batch.add_argument("--seed", type=integer(0, SEED_LIMIT - 1),
                       help="line n without a seed gets SEED + n - 1 (default: random, recorded)")
    batch.add_argument("--refiner", action=argparse.BooleanOptionalAction, default=True)
    batch.add_argument("--reprompt", choices=["7b", "32b"])
    batch.add_argument("--trust-remote-code", action="store_true")
    batch.add_argument("--overwrite", action="store_true", help="redo every line (results.jsonl starts afresh)")
    add_lora_argument(batch, note="; every line runs with them")
    add_parallel_argument(batch, data_parallel=True)
    add_loading_arguments(batch)
    batch.set_defaults(run=run_batch)


def run_batch(args: argparse.Namespace) -> int:
    """Check every line and the launch, then draw what is not done yet."""
    variant = VARIANT_ALIASES[args.variant]
    check_aspect_ratio(args)
    lines = read_prompts(args.prompts)
    defaults = DISTILLED_DEFAULTS if "distilled" in variant else BASE_DEFAULTS
    jobs = resolve_jobs(lines, args, defaults, source=args.prompts)
    loras = lora_arguments(args.lora)
    device = check_loading_arguments(args)
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"--out {args.out} is a file; pass a folder for the images")
    state = None
    if args.parallel is not None or launched_by_torchrun():
        device_type = (args.device or default_device()).split(":")[0]
        state = ParallelState.create(args.parallel or ParallelConfig(), exact=False, device_type=device_type)
    first = state is None or state.rank == 0
    if state is not None and device == "cuda":
        device = state.device  # one GPU per rank: cuda:LOCAL_RANK

    with ExitStack() as hold:
        hold.enter_context(resume_hint(args, lines))  # outermost: runs after the folder's lock is released
        if first:
            args.out.mkdir(parents=True, exist_ok=True)
            hold.enter_context(lock_job_folder(args.out))  # one job per folder, until this one ends
            remove_partial_files(args.out)
            if args.overwrite:
                (args.out / RESULTS).unlink(missing_ok=True)
            if args.download:
                fetch(DownloadConfig(variant=variant, fp8=args.fp8, refiner=args.refiner, reprompt=args.reprompt),
                      args.model_root)
        records = read_results(args.out) if first else {}
        todo = [job for job, entry in zip(jobs, lines) if not is_complete(args.out, entry, records)]
        quiet = getattr(args, "quiet", False)  # -q: no progress bar
        progress = JobProgress(args.out, len(jobs), len(jobs) - len(todo), enabled=first and not quiet)
        if state is not None:  # one plan for all ranks: rank 0's (its scan, its random seeds)
            shared = [todo]
            dist.broadcast_object_list(shared, src=0)
            todo = shared[0]
        mine = todo if state is None else todo[state.dp_rank :: state.dp_size]
        writer = state is None or state.is_writer
        progress.done = len(jobs) - len(todo)
        if first and len(todo) < len(jobs):
            done = len(jobs) - len(todo)
            logger.info(f"{done} of {len(jobs)} images are done already in {args.out}; drawing the other {len(todo)}")

        # lazy: checks the checkpoint files and the parallel configuration now, loads the parts for the first image
        parallel = state if args.parallel is not None else None
        pipe = pipeline_from_args(args, variant, args.reprompt or "32b", progress_bar=False, parallel=parallel).to(device)
        load_loras(pipe, loras)
        with sigterm_as_exit():
            for job in mine:
                result = pipe(
                    prompt=job.prompt,
                    negative_prompt=job.negative_prompt,
                    width=job.width,
                    height=job.height,
                    num_inference_steps=job.steps,
                    guidance_scale=job.guidance_scale,
                    shift=job.shift,
                    seed=job.seed,
                    use_reprompt=args.reprompt is not None,
                    use_refiner=args.refiner,
                    output_type="pt",
                    callback=progress.refresh if first else None,
                )
                if writer:
                    record = dict(asdict(job), variant=variant, fp8=args.fp8, refiner=args.refiner,
                                  reprompt=args.reprompt, lora=args.lora, prompt_used=result.prompts[0],
                                  cache=pipe.cache_stats)
                    write_png_atomic(result.images[0], args.out / job.file, record)
                    append_result(args.out, record)
                progress.refresh()
            if state is not None:
                dist.barrier()
                dist.destroy_process_group()
        progress.close()
        if first:
            logger.info(f"{len(jobs)} images in {args.out} ({len(todo)} drawn now); settings in {args.out / RESULTS}")
    return 0


@contextmanager
def resume_hint(args: argparse.Namespace, lines: list[BatchLine]) -> Iterator[None]:
    """Ctrl-C says how far the job got and that running the same command again resumes it."""
    try:
        yield
    except KeyboardInterrupt:
        records = read_results(args.out) if args.out.is_dir() else {}
        done = sum(is_complete(args.out, entry, records) for entry in lines)
        again = "the same command without --overwrite" if args.overwrite else "the same command again"
        raise KeyboardInterrupt(
            f"interrupted: {done} of {len(lines)} images are done in {args.out}; run {again} to draw the other "
            f"{len(lines) - done} (the images done are kept)"
        ) from None
