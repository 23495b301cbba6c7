"""The generation engine of a replica: batches of jobs on pipeline views in worker threads.

`ImageEngine.generate` is a coroutine: the replica's event loop keeps accepting requests
while a bounded pool of threads runs the pipeline (torch releases the GIL in its kernels).
Compatible jobs are grouped into one pipeline call by `deployments/generator/batching.py`;
each call runs on its own pipeline view (see `deployments/generator/pipelines.py`), with the
arguments of `deployments/generator/call_arguments.py`. Cancelling the coroutine (the client
went away, or the request timed out) cannot stop a thread, so a running batch whose jobs are
all cancelled is told through the pipeline's step callback, which raises at the next
denoising step; a job still waiting is simply dropped from its batch.

The same step callback feeds streamed jobs (`ImageEngine.stream`): it reports progress and,
at the steps a job asked previews for, turns that job's slice of the latents into small
previews (`deployments/generator/previews.py`). It also times each call's phases for the
request logs and the metrics (`deployments/generator/call_timing.py`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import DiffusionPipeline

from deployments.generator.batching import BatchQueue, EventSink, QueuedJob
from deployments.generator.call_arguments import StepCallback, pipeline_arguments
from deployments.generator.call_timing import CallTimer, CallTimes
from deployments.generator.pipelines import RequestPipelines, call_parameters
from deployments.generator.previews import fit_previewer
from deployments.jobs import (
    GeneratedImages,
    GenerationEvent,
    GenerationJob,
    ModelCapabilities,
    PartialImage,
    StepProgress,
    preview_steps,
)
from deployments.model_config import BatchingConfig

logger = logging.getLogger("ray.serve")

# Streamed progress is sent at most this often per job (and always after the last step): a
# page needs a few updates a second, not one per step of a fast model.
PROGRESS_INTERVAL_S = 0.1

# The engine's batching unless told otherwise: every job runs alone, at once.
UNBATCHED = BatchingConfig(max_batch_images=1, max_wait_ms=0)


class EngineMetrics(Protocol):
    """What the engine reports, for `deployments/metrics.py` (or a test) to record."""

    def batch_finished(
        self, images: int, generate_s: float, steps: int, denoise_s: float
    ) -> None: ...

    def queue_changed(self, waiting_jobs: int) -> None: ...


class GenerationCancelled(Exception):
    """Raised inside the worker thread to stop a job whose caller is gone."""


class ReplicaBroken(RuntimeError):
    """The device failed in a way that later jobs would hit too (a CUDA error, say)."""


def _is_device_failure(error: BaseException) -> bool:
    # torch raises AcceleratorError (a RuntimeError) for CUDA errors; after one the CUDA
    # context is unusable, and only a new process recovers. Out-of-memory is not one of them.
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and "CUDA error" in str(error)


class ImageEngine:
    """Runs jobs on one shared pipeline in `worker_threads` threads, grouped into pipeline
    calls as `batching` says (by default, each job alone)."""

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        worker_threads: int,
        batching: BatchingConfig = UNBATCHED,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self._pipelines = RequestPipelines(pipeline)
        self._previewer = fit_previewer(pipeline)
        self._metrics = metrics
        self._pool = ThreadPoolExecutor(worker_threads, thread_name_prefix="generate")
        self._queue = BatchQueue(
            self._run_batch,
            self._pool,
            workers=worker_threads,
            settings=batching,
            on_change=metrics.queue_changed if metrics is not None else None,
        )
        self._broken: BaseException | None = None
        self._steps_lock = threading.Lock()
        self.steps_run = 0  # denoising steps completed by all batches; tests read it

    def capabilities(self) -> ModelCapabilities:
        return self._pipelines.capabilities()

    def check_health(self) -> None:
        """Raise if the replica can no longer generate, so that Serve replaces it."""
        if self._broken is not None:
            raise ReplicaBroken(f"the device failed: {type(self._broken).__name__}")

    @property
    def batch_sizes(self) -> list[int]:
        """Images in each of the most recent batches, oldest first."""
        return list(self._queue.batch_sizes)

    async def generate(self, job: GenerationJob, sink: EventSink | None = None) -> GeneratedImages:
        """The job's images; `sink`, if given, is called (from a worker thread) with its
        progress and previews."""
        try:
            return await self._queue.submit(job, sink)
        except asyncio.CancelledError:
            logger.info("request %s cancelled; its generation stops", job.request_id)
            raise

    async def stream(self, job: GenerationJob) -> AsyncIterator[GenerationEvent]:
        """The job's progress and previews as they happen, then its `GeneratedImages`.

        Closing the iterator early (the client went away) cancels the generation.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | None] = asyncio.Queue()

        def sink(event: GenerationEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        # The worker thread's events reach the loop before the batch's result does (both go
        # through call_soon_threadsafe, in order), so None comes after all of them.
        task = asyncio.ensure_future(self.generate(job, sink))
        task.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (event := await events.get()) is not None:
                yield event
            yield task.result()
        finally:
            task.cancel()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run_batch(
        self, queued: list[QueuedJob], cancelled: threading.Event
    ) -> list[GeneratedImages]:
        """One pipeline call for compatible jobs (see `batch_key`); results in job order."""
        if cancelled.is_set():
            raise GenerationCancelled()
        timer = CallTimer()
        jobs = [entry.job for entry in queued]
        first = jobs[0]
        view = self._pipelines.view(first.task)
        reporter = _StepReporter(
            queued,
            self._previewer,
            spatial=functools.partial(_spatial_latents, view, first.width, first.height),
        )
        on_step_end = self._step_callback(timer, reporter, cancelled, first.num_inference_steps)
        view.encode_prompt = timer.timed_encode_prompt(view.encode_prompt)
        arguments = pipeline_arguments(jobs, call_parameters(type(view)), on_step_end)
        pixels = self._call(view, arguments)
        times = timer.finished()
        if self._metrics is not None:
            self._metrics.batch_finished(
                images=len(pixels),
                generate_s=times.generate_s,
                steps=times.steps,
                denoise_s=times.denoise_s,
            )
        return _results(queued, pixels, times)

    def _step_callback(
        self,
        timer: CallTimer,
        reporter: _StepReporter,
        cancelled: threading.Event,
        asked_steps: int,
    ) -> StepCallback:
        """The pipeline's `callback_on_step_end` for one batch: times and counts the step,
        stops a cancelled batch, and reports to the batch's streamed jobs."""

        def on_step_end(pipeline, step: int, _timestep, callback_kwargs: dict[str, Any]):
            timer.step_ended(step)
            with self._steps_lock:
                self.steps_run += 1
            if cancelled.is_set():
                raise GenerationCancelled()
            # Edits run fewer steps than asked (num_inference_steps x strength).
            total = getattr(pipeline, "_num_timesteps", None) or asked_steps
            reporter.step_done(step + 1, total, callback_kwargs["latents"])
            return callback_kwargs

        return on_step_end

    def _call(self, view: DiffusionPipeline, arguments: dict[str, Any]) -> list[np.ndarray]:
        """The pipeline call itself: its images as uint8 arrays, in batch order."""
        try:
            output = view(**arguments)
        except GenerationCancelled:
            raise
        except Exception as error:
            if _is_device_failure(error):
                self._broken = error
            raise
        return list(_to_uint8(output.images))


def _results(
    queued: list[QueuedJob], pixels: list[np.ndarray], times: CallTimes
) -> list[GeneratedImages]:
    """The batch's images split back into its jobs, each with the account of its call."""
    results = []
    batch_images = len(pixels)
    for entry in queued:
        job = entry.job
        images, pixels = pixels[: job.num_images], pixels[job.num_images :]
        results.append(
            GeneratedImages(
                images=images,
                seeds=job.seeds,
                generate_s=times.generate_s,
                batch_images=batch_images,
                queue_s=times.started - entry.submitted,
                text_encode_s=times.text_encode_s,
                denoise_s=times.denoise_s,
                decode_s=times.decode_s,
            )
        )
    return results


class _StepReporter:
    """Sends each streamed job of a batch its progress and, at its preview steps, previews.

    Runs in the worker thread, inside the pipeline's step callback. `spatial` turns the
    pipeline's latents into (B, C, h, w), whatever the family's layout.
    """

    def __init__(
        self,
        queued: list[QueuedJob],
        previewer,
        spatial: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self._streamed: list[tuple[GenerationJob, EventSink, int]] = []
        offset = 0  # the job's first image in the batch
        for entry in queued:
            if entry.sink is not None:
                self._streamed.append((entry.job, entry.sink, offset))
            offset += entry.job.num_images
        self._previewer = previewer
        self._spatial = spatial
        self._last_progress = 0.0

    def step_done(self, step: int, total: int, latents: torch.Tensor) -> None:
        if not self._streamed:
            return
        now = time.monotonic()
        send_progress = step == total or now - self._last_progress >= PROGRESS_INTERVAL_S
        if send_progress:
            self._last_progress = now
        for job, sink, offset in self._streamed:
            steps = preview_steps(job.partial_images, total) if self._previewer else ()
            if step in steps:
                index = steps.index(step)
                own = self._spatial(latents[offset : offset + job.num_images])
                for image_index, pixels in enumerate(self._previewer.to_rgb(own)):
                    sink(PartialImage(image_index, index, pixels))
            if send_progress:
                sink(StepProgress(step=step, total_steps=total))


def _spatial_latents(
    pipeline: DiffusionPipeline, width: int, height: int, latents: torch.Tensor
) -> torch.Tensor:
    """Latents as (B, C, h, w). FLUX-style pipelines denoise 2x2 patches packed into a
    sequence, (B, h/2 * w/2, 4C), and say how to unpack them."""
    if latents.ndim == 3 and hasattr(pipeline, "_unpack_latents"):
        return pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
    return latents


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output in [0, 1] floats to uint8, rounding the same way everywhere."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
