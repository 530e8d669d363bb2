"""One thread owns the pipeline: a bounded queue of jobs, compatible jobs batched, cancellation between steps.

A job is one HTTP request (`n` images). The worker takes the oldest job and, up to `max_batch` images, the
later jobs with the same `batch_key` (size, steps, guidance, shift, refiner, reprompt), and runs them as one
pipeline call with one prompt, negative prompt and seed per image, so each job's images come from its own
seeds. A batched call gives the same images as the jobs one at a time up to float rounding: a matrix
product over a batch of B rows is not bit-identical to B products of one row (measured on the tiny tree:
2e-7 in the latents; 0.005% of the 8-bit values off by one level), which is why `max_batch` defaults to 1.

A cancelled job (its client went away) stops its call at the next denoising step; the other jobs of that
call are run again (same seeds, same images). A call that fails with several jobs is retried one job at a
time, so only the job that fails gets the error. Progress goes to each job's listeners as events.
"""

import asyncio
import concurrent.futures
import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from loguru import logger
from PIL import Image, PngImagePlugin

from hyimage.diffusion.pipelines.parts import to_uint8
from hyimage.metadata import png_text
from hyimage.serving.validation import ApiError, GenerationRequest


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already."""


class Cancelled(Exception):
    """Raised from the step callback to stop a call whose job was cancelled."""


@dataclass
class GeneratedImage:
    """One image of a job: PNG bytes (settings in the metadata), its seed and the prompt as used."""

    png: bytes
    seed: int
    revised_prompt: str


@dataclass
class Job:
    """One request waiting for, or getting, its images. Listeners get progress events (dicts) in their loop."""

    request: GenerationRequest
    created: int = field(default_factory=lambda: int(time.time()))
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = field(default_factory=list)

    def listen(self) -> asyncio.Queue:
        """A queue in the running event loop that receives this job's events (call before submitting)."""
        queue: asyncio.Queue = asyncio.Queue()
        self.listeners.append((asyncio.get_running_loop(), queue))
        return queue

    def publish(self, event: dict) -> None:
        for loop, queue in self.listeners:
            if not loop.is_closed():  # closed once the server has shut down
                loop.call_soon_threadsafe(queue.put_nowait, event)

    def finish(self, images: list[GeneratedImage]) -> None:
        self.future.set_result(images)
        self.publish({"type": "done", "images": images})

    def fail(self, error: Exception) -> None:
        self.future.set_exception(error)
        self.publish({"type": "error", "error": error})


StepHook = Callable[[list[Job], int], None]


@dataclass
class Stats:
    """Counts shown by /health."""

    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    calls: int = 0
    largest_batch: int = 0


class Worker:
    """Runs jobs on `pipe` in one thread. `settings` go into every PNG's metadata (variant, fp8, ...)."""

    def __init__(
        self,
        pipe: Any,
        *,
        max_queue: int = 16,
        max_batch: int = 1,
        settings: dict | None = None,
        step_hook: StepHook | None = None,
    ) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue and max_batch must be at least 1, got {max_queue} and {max_batch}")
        self.pipe = pipe
        self.max_queue, self.max_batch = max_queue, max_batch
        self.settings = dict(settings or {})
        self.step_hook = step_hook
        self.stats = Stats()
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._condition = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="hyimage-worker", daemon=True)

    def start(self) -> "Worker":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify_all()
        self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise QueueFull."""
        with self._condition:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._pending.append(job)
            job.publish({"type": "queued", "queue_position": len(self._pending)})
            self._condition.notify_all()

    def cancel(self, job: Job) -> None:
        """Cancel `job`: dropped from the queue at once, or stopped at the next step if it is running."""
        with self._condition:
            if job.future.done():
                return
            job.cancelled.set()
            if job in self._pending:
                self._pending.remove(job)
                self._cancelled(job)
                self._announce_positions()
                self._condition.notify_all()

    def wait_for(self, predicate: Callable[["Worker"], bool], timeout: float = 60.0) -> bool:
        """Block until `predicate(self)` holds after a change of the queue (for callers that coordinate)."""
        with self._condition:
            return self._condition.wait_for(lambda: predicate(self), timeout)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    # The worker thread.
    def _loop(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending or self._stopped)
                if self._stopped:
                    return
                batch = self._take_batch()
                self._running = batch
                self._announce_positions()
                self._condition.notify_all()
            self._run(batch)
            with self._condition:
                self._running = []
                self._condition.notify_all()

    def _take_batch(self) -> list[Job]:
        """The oldest job and the later compatible ones, up to `max_batch` images (under the lock)."""
        first = self._pending[0]
        batch, images = [first], first.request.n
        for job in self._pending[1:]:
            if job.request.batch_key() == first.request.batch_key() and images + job.request.n <= self.max_batch:
                batch.append(job)
                images += job.request.n
        for job in batch:
            self._pending.remove(job)
        return batch

    def _announce_positions(self) -> None:
        for position, job in enumerate(self._pending, start=1):
            job.publish({"type": "queued", "queue_position": position})

    def _cancelled(self, job: Job) -> None:
        self.stats.cancelled += 1
        logger.info(f"request cancelled: {job.request.prompt[:60]!r}")
        job.fail(Cancelled("the client disconnected"))

    def _run(self, batch: list[Job]) -> None:
        try:
            results = self._generate(batch)
        except Cancelled:
            live = [job for job in batch if not job.cancelled.is_set()]
            for job in batch:
                if job.cancelled.is_set():
                    self._cancelled(job)
            if live:
                with self._condition:
                    self._running = live
                    self._condition.notify_all()
                self._run(live)
            return
        except Exception as error:  # a request's failure must not stop the server
            if len(batch) > 1:
                logger.warning(f"a batch of {len(batch)} requests failed ({error}); running them one at a time")
                for job in batch:
                    self._run([job])
                return
            if not isinstance(error, (ApiError, ValueError)):
                logger.exception("request failed")
            self.stats.failed += 1
            batch[0].fail(error)
            return
        for job, images in zip(batch, results):
            self.stats.completed += 1
            job.finish(images)

    def _generate(self, batch: list[Job]) -> list[list[GeneratedImage]]:
        """One pipeline call for every image of `batch`; the images regrouped per job."""
        first = batch[0].request
        prompts = [job.request.prompt for job in batch for _ in range(job.request.n)]
        negatives = [job.request.negative_prompt for job in batch for _ in range(job.request.n)]
        seeds = [seed for job in batch for seed in job.request.seeds]
        self.stats.calls += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(prompts))

        def publish(event: dict) -> None:
            for job in batch:
                job.publish(event)

        def on_step(step: int, timestep: float, latents: torch.Tensor) -> None:
            if self.step_hook is not None:
                self.step_hook(batch, step)
            if any(job.cancelled.is_set() for job in batch):
                raise Cancelled
            publish({"type": "progress", "stage": "denoise", "step": step + 1, "steps": first.steps})
            if step + 1 == first.steps:
                publish({"type": "progress", "stage": "decode"})

        publish({"type": "progress", "stage": "encode", "batch_size": len(prompts)})
        with self._refiner_progress(batch, publish) if first.use_refiner else nullcontext():
            result = self.pipe(
                prompt=prompts,
                negative_prompt=negatives,
                width=first.width,
                height=first.height,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                shift=first.shift,
                seed=seeds,
                use_refiner=first.use_refiner,
                use_reprompt=first.use_reprompt,
                output_type="pt",
                callback=on_step,
            )
        images = iter(zip(to_uint8(result.images), result.prompts, result.seeds))
        grouped = []
        for job in batch:
            grouped.append([self._image(job.request, *next(images)) for _ in range(job.request.n)])
        return grouped

    @contextmanager
    def _refiner_progress(self, batch: list[Job], publish: Callable[[dict], None]) -> Iterator[None]:
        """Progress and cancellation in the refiner stage, from a forward hook on the refiner's DiT (the pipeline
        calls the refiner without a step callback; the guidance-distilled refiner runs one forward per step)."""
        refiner = self.pipe.refiner_pipeline
        steps = refiner.default_num_inference_steps
        done = 0

        def after_forward(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            nonlocal done
            if any(job.cancelled.is_set() for job in batch):
                raise Cancelled
            done += 1
            publish({"type": "progress", "stage": "refine", "step": done, "steps": steps})

        handle = refiner.dit.register_forward_hook(after_forward)
        try:
            yield
        finally:
            handle.remove()

    def _image(self, request: GenerationRequest, pixels: Any, used_prompt: str, seed: int) -> GeneratedImage:
        settings = dict(
            self.settings,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            shift=request.shift,
            refiner=request.use_refiner,
            reprompt=request.use_reprompt,
            seed=seed,
            prompt_used=used_prompt,
        )
        return GeneratedImage(png=png_bytes(pixels, settings), seed=seed, revised_prompt=used_prompt)


def png_bytes(pixels: Any, settings: dict) -> bytes:
    """An (H, W, 3) uint8 array as PNG with `settings` in the text chunks `hyimage generate` writes."""
    info = PngImagePlugin.PngInfo()
    for key, text in png_text(settings).items():
        info.add_text(key, text)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
