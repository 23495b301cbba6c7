"""The generation engine of a replica: batches of jobs on pipeline views in worker threads.

`ImageEngine.generate` is a coroutine: the replica's event loop keeps accepting requests
while a bounded pool of threads runs the pipeline (torch releases the GIL in its kernels).
Compatible jobs are grouped into one pipeline call by `deployments/batching.py`; each call
runs on its own pipeline view (see `deployments/pipelines.py`). Cancelling the coroutine (the
client went away, or the request timed out) cannot stop a thread, so a running batch whose
jobs are all cancelled is told through the pipeline's step callback, which raises at the next
denoising step; a job still waiting is simply dropped from its batch.

The same step callback feeds streamed jobs (`ImageEngine.stream`): it reports progress and,
at the steps a job asked previews for, turns that job's slice of the latents into small
previews (`deployments/previews.py`). It also times each call's phases for the request logs
and the metrics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from deployments.batching import BatchQueue
from deployments.jobs import (
    GeneratedImages,
    GenerationEvent,
    GenerationJob,
    ModelCapabilities,
    PartialImage,
    StepProgress,
    preview_steps,
)
from deployments.pipelines import RequestPipelines, call_parameters
from deployments.previews import fit_previewer

logger = logging.getLogger("ray.serve")

# Streamed progress is sent at most this often per job (and always after the last step): a
# page needs a few updates a second, not one per step of a fast model.
PROGRESS_INTERVAL_S = 0.1

EventSink = Callable[[GenerationEvent], None]


class EngineMetrics(Protocol):
    """What the engine reports, for `deployments/metrics.py` (or a test) to record."""

    def batch_finished(
        self, images: int, generate_s: float, steps: int, denoise_s: float
    ) -> None: ...

    def queue_changed(self, waiting_jobs: int) -> None: ...


@dataclass
class _Tracked:
    """What the engine keeps of a job between its submission and its batch."""

    submitted: float
    sink: EventSink | None


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
    def __init__(
        self,
        pipeline: DiffusionPipeline,
        worker_threads: int,
        max_batch_images: int = 1,
        max_wait_s: float = 0.0,
        max_batch_pixels: int | None = None,
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
            max_batch_images=max_batch_images,
            max_batch_pixels=max_batch_pixels,
            max_wait_s=max_wait_s,
            on_change=metrics.queue_changed if metrics is not None else None,
        )
        # Jobs between submission and result, by identity: equal jobs (same parameters and
        # seeds) from two requests are still two jobs. Read by the worker threads.
        self._tracked: dict[int, _Tracked] = {}
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
        self._tracked[id(job)] = _Tracked(submitted=time.perf_counter(), sink=sink)
        try:
            return await self._queue.submit(job)
        except asyncio.CancelledError:
            logger.info("request %s cancelled; its generation stops", job.request_id)
            raise
        finally:
            self._tracked.pop(id(job), None)

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
        self, jobs: list[GenerationJob], cancelled: threading.Event
    ) -> list[GeneratedImages]:
        """One pipeline call for compatible jobs (see `batch_key`); results in job order."""
        if cancelled.is_set():
            raise GenerationCancelled()
        started = time.perf_counter()
        tracked = [self._tracked.get(id(job)) for job in jobs]
        first = jobs[0]
        prompts = [job.prompt for job in jobs for _ in job.seeds]
        negative_prompts = None
        if first.negative_prompt is not None:  # the same for all jobs of a batch
            negative_prompts = [job.negative_prompt for job in jobs for _ in job.seeds]
        # One generator per image, on the CPU: each image's noise depends only on its own seed
        # (not on its batch neighbours), and a seed gives the same noise on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for job in jobs for s in job.seeds]
        view = self._pipelines.view(first.task)
        reporter = _StepReporter(
            jobs,
            [t.sink if t else None for t in tracked],
            self._previewer,
            spatial=functools.partial(_spatial_latents, view, first.width, first.height),
        )
        denoise_started = started
        last_step_end = started
        steps_done = 0

        def on_step_end(pipeline, step, _timestep, callback_kwargs):
            nonlocal last_step_end, steps_done
            last_step_end = time.perf_counter()
            steps_done = step + 1
            with self._steps_lock:
                self.steps_run += 1
            if cancelled.is_set():
                raise GenerationCancelled()
            # Edits run fewer steps than asked (num_inference_steps x strength).
            total = getattr(pipeline, "_num_timesteps", None) or first.num_inference_steps
            reporter.step_done(step + 1, total, callback_kwargs["latents"])
            return callback_kwargs

        text_encode_s = 0.0
        encode_prompt = view.encode_prompt

        def timed_encode_prompt(*args, **kwargs):
            nonlocal text_encode_s, denoise_started
            encode_started = time.perf_counter()
            try:
                return encode_prompt(*args, **kwargs)
            finally:
                denoise_started = time.perf_counter()
                text_encode_s += denoise_started - encode_started

        view.encode_prompt = timed_encode_prompt
        arguments = {
            "prompt": prompts,
            "negative_prompt": negative_prompts,
            "width": first.width,
            "height": first.height,
            "num_inference_steps": first.num_inference_steps,
            "guidance_scale": first.guidance_scale,
            "generator": generators,
            "output_type": "np",
            "callback_on_step_end": on_step_end,
        }
        if first.image is not None:  # an edit: each image of each job starts from its input
            arguments["image"] = _per_image(jobs, [_pil(job.image) for job in jobs])
            arguments["strength"] = first.strength
        if first.mask is not None:
            arguments["mask_image"] = _per_image(jobs, [_pil(job.mask) for job in jobs])
        # The ingress rejected what a client asked for that this pipeline does not take; what
        # is left out here are the service's own defaults (say, `width` for a pipeline that
        # takes its size from the input image).
        takes = call_parameters(type(view))
        arguments = {name: value for name, value in arguments.items() if name in takes}
        try:
            output = view(**arguments)
        except GenerationCancelled:
            raise
        except Exception as error:
            if _is_device_failure(error):
                self._broken = error
            raise
        pixels = list(_to_uint8(output.images))
        finished = time.perf_counter()
        elapsed = finished - started
        denoise_s = last_step_end - denoise_started
        if self._metrics is not None:
            self._metrics.batch_finished(
                images=len(pixels),
                generate_s=elapsed,
                steps=steps_done,
                denoise_s=denoise_s,
            )
        results = []
        batch_images = len(pixels)
        for job, record in zip(jobs, tracked, strict=True):
            images, pixels = pixels[: job.num_images], pixels[job.num_images :]
            results.append(
                GeneratedImages(
                    images=images,
                    seeds=job.seeds,
                    generate_s=elapsed,
                    batch_images=batch_images,
                    queue_s=started - record.submitted if record else 0.0,
                    text_encode_s=text_encode_s,
                    denoise_s=denoise_s,
                    decode_s=finished - last_step_end,
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
        jobs: list[GenerationJob],
        sinks: list[EventSink | None],
        previewer,
        spatial: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self._streamed = []
        offset = 0
        for job, sink in zip(jobs, sinks, strict=True):
            if sink is not None:
                self._streamed.append((job, sink, offset))
            offset += job.num_images
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


def _pil(pixels: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(pixels)


def _per_image(jobs: list[GenerationJob], per_job: list) -> list:
    """One entry per image of the batch: each job's own, repeated for each of its seeds."""
    return [value for job, value in zip(jobs, per_job, strict=True) for _ in job.seeds]


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output in [0, 1] floats to uint8, rounding the same way everywhere."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
