"""The generation engine of a replica: batches of jobs on pipeline views in worker threads.

`ImageEngine.generate` is a coroutine: the replica's event loop keeps accepting requests
while a bounded pool of threads runs the pipeline (torch releases the GIL in its kernels).
Compatible jobs are grouped into one pipeline call by `deployments/generator/calls/batching.py`;
each call runs on its own pipeline view (see `deployments/generator/model/pipelines.py`), with the
arguments of `deployments/generator/calls/call_arguments.py`. A call that fails for a reason of
its own (one job's bad prompt, running out of memory) runs again in smaller calls, so that a
bad job fails alone (`deployments/generator/calls/call_plan.py`); only a broken device fails the
replica. Cancelling the coroutine (the client went away, or the request timed out) cannot
stop a thread, so a running batch whose jobs are all cancelled is told through the
pipeline's step callback, which raises at the next denoising step; a job still waiting is
simply dropped from its batch.

The step callback also feeds streamed jobs (`ImageEngine.stream`: progress, and previews
from a job's slice of the latents, `previews.py`), times each call's phases for the logs and
metrics (`call_timing.py`), and takes each step's work off the held work the autoscaler reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import DiffusionPipeline

from deployments.config.model_config import BatchingConfig
from deployments.generator.adapters.adapter_gate import CallAbandoned
from deployments.generator.adapters.adapter_store import AdapterStore
from deployments.generator.calls.batching import BatchQueue, EventSink, QueuedJob, adapter_key
from deployments.generator.calls.call_arguments import StepCallback, pipeline_arguments
from deployments.generator.calls.call_plan import BatchRun, CallPart, is_out_of_memory
from deployments.generator.calls.call_timing import CallTimer, CallTimes
from deployments.generator.loop.continuous_batching import ContinuousBatching, CountingExecutor
from deployments.generator.loop.denoise_loop import LaneHooks
from deployments.generator.loop.flow_families import family_of
from deployments.generator.loop.loop_adapters import LoopAdapters
from deployments.generator.model.cache_hooks import call_scope
from deployments.generator.model.components import denoiser_of, to_uint8
from deployments.generator.model.pipelines import RequestPipelines, call_parameters
from deployments.generator.model.torch_threads import worker_pool
from deployments.generator.progress.previews import StepReporter, fit_previewer, spatial_latents
from deployments.generator.progress.prompt_tokens import PromptTokens
from deployments.jobs import (
    AdapterUnavailable,
    GeneratedImages,
    GenerationEvent,
    GenerationJob,
    ModelCapabilities,
    ReplicaBroken,
)

logger = logging.getLogger("ray.serve")

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


def _is_device_failure(error: BaseException) -> bool:
    # torch raises AcceleratorError (a RuntimeError) for CUDA errors; after one the CUDA
    # context is unusable, and only a new process recovers. Out-of-memory is not one of them
    # ("CUDA error: out of memory" leaves the context usable): its call is split and rerun.
    if is_out_of_memory(error):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and "CUDA error" in str(error)


class ImageEngine:
    """Runs jobs on one shared pipeline in `worker_threads` threads, grouped into pipeline
    calls as `batching` says (by default, each job alone). A call holds at most
    `batching.max_batch_pixels` pixels, or one image: a larger job runs in several.
    With `adapters`, jobs may name LoRA adapters: calls with different adapter sets never
    overlap (`deployments/generator/adapters/adapter_gate.py`)."""

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        worker_threads: int,
        batching: BatchingConfig = UNBATCHED,
        metrics: EngineMetrics | None = None,
        adapters: AdapterStore | None = None,
        pool: ThreadPoolExecutor | None = None,
        continuous: bool = False,
    ) -> None:
        """`pool`, if given, is the executor of `worker_threads` threads that loaded the
        pipeline (see `deployments/generator/model/torch_threads.py`); otherwise one is made.
        `continuous`: text-to-image jobs of SD3 and FLUX run in the continuous loop
        (`continuous_batching.py`), the rest as below."""
        self._pipelines = RequestPipelines(pipeline)
        self.device = pipeline.device
        self.adapters = adapters
        self._previewer = fit_previewer(pipeline)
        self._prompt_tokens = PromptTokens(pipeline)
        self._metrics = metrics
        self._pool = pool or worker_pool(worker_threads)
        self._executor = CountingExecutor(self._pool)
        self._queue = BatchQueue(
            self._run_batch,
            self._executor,
            workers=worker_threads,
            settings=batching,
            on_change=metrics.queue_changed if metrics is not None else None,
        )
        self._batching = batching
        self._broken: BaseException | None = None
        self._steps_lock = threading.Lock()
        self.steps_run = 0  # denoising steps completed by all batches; tests read it
        self.work = self._queue.work  # held jobs' steps x pixels (the autoscaling policy's)
        self._continuous = self._continuous_batching(worker_threads) if continuous else None

    @property
    def continuous(self) -> bool:
        """Whether text-to-image jobs run in the continuous loop."""
        return self._continuous is not None

    def _continuous_batching(self, lanes: int) -> ContinuousBatching | None:
        view = self._pipelines.view()
        family = family_of(view)
        if family is None:
            logger.info("%s runs per call: no continuous loop for it", type(view).__name__)
            return None
        adapters = None
        if self.adapters is not None:
            adapters = LoopAdapters(self.adapters, denoiser_of(view), self.device)
        hooks = LaneHooks(
            capacity=self._batching.images_per_batch,
            step_done=self._loop_step_done,
            job_done=self._loop_job_done,
            broken=self._device_failed,
            others_waiting=lambda: self._executor.waiting > 0,
        )
        return ContinuousBatching(
            family, self._pool, lanes, self._batching, hooks, self.work, self._previewer, adapters
        )

    def _loop_step_done(self, jobs: list, images: int) -> None:
        with self._steps_lock:
            self.steps_run += 1
        self.work.step_done(jobs)
        self._queue.batch_sizes.append(images)

    def _loop_job_done(self, job, result: GeneratedImages) -> None:
        if self._metrics is not None:
            self._metrics.batch_finished(
                images=len(result.images),
                generate_s=result.generate_s,
                steps=job.job.num_inference_steps,
                denoise_s=result.denoise_s,
            )

    def _device_failed(self, error: BaseException) -> bool:
        if _is_device_failure(error):
            self._broken = error
            return True
        return False

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
        if self._broken is not None:  # until Serve's health check replaces the replica
            raise ReplicaBroken(f"the device failed: {type(self._broken).__name__}")
        await self._stage_adapters(job)
        runs = self._queue
        if self._continuous is not None and self._continuous.accepts(job):
            runs = self._continuous
        try:
            return await self._prompt_tokens.counted(job, await runs.submit(job, sink))
        except asyncio.CancelledError:
            logger.info("request %s cancelled; its generation stops", job.request_id)
            raise

    async def _stage_adapters(self, job: GenerationJob) -> None:
        """Fetch and check the job's adapters off the event loop before it queues, so that
        its batch's switch only loads them. Raises `AdapterUnavailable` (a 400)."""
        if not job.adapters:
            return
        if self.adapters is None:
            raise AdapterUnavailable(job.adapters[0][0], "this model has no adapters")
        missing = self.adapters.missing(adapter_id for adapter_id, _ in job.adapters)
        if missing:
            await asyncio.to_thread(self.adapters.prefetch, missing)

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
    ) -> list[GeneratedImages | Exception]:
        """Runs compatible jobs (see `batch_key`) in one pipeline call, or more where a job
        is too large for one or a call fails (see `deployments/generator/calls/call_plan.py`):
        each job's images or the exception it fails with, in job order."""
        if cancelled.is_set():
            raise GenerationCancelled()
        first = queued[0].job
        capacity = self._batching.images_per_call(first.width, first.height)
        adapters = adapter_key(first.adapters)  # the batch's (its key has them)
        if self.adapters is None:  # then no job has adapters (`_stage_adapters`)
            gate = contextlib.nullcontext()
        else:
            # Held across the batch's calls: no call with another adapter set overlaps them.
            gate = self.adapters.gate.enter(adapters, cancelled)
        try:
            with gate:
                batch = BatchRun(queued, capacity, started=time.perf_counter())
                for parts in batch.planned_calls():
                    self._run_call(parts, cancelled, batch)
        except CallAbandoned:
            raise GenerationCancelled() from None
        return batch.results()

    def _run_call(self, parts: list[CallPart], cancelled: threading.Event, batch: BatchRun) -> None:
        """One pipeline call over `parts`, recorded in `batch`; if it fails for a reason of
        its own, the same images again in smaller calls. A cancelled batch and a broken
        device fail every job of the batch (raised)."""
        parts = batch.unfailed(parts)
        if not parts:
            return
        try:
            pixels, times = self._call(parts, cancelled)
        except GenerationCancelled:
            raise
        except Exception as error:
            if self._device_failed(error):
                raise ReplicaBroken(f"the device failed: {type(error).__name__}") from error
            smaller = batch.failed(parts, error)
        else:
            batch.succeeded(parts, pixels, times)
            return
        # Only past the `except` block are the failed call's traceback and the tensors its
        # frames hold freed (PyTorch's FAQ on recovering from out-of-memory says so): the
        # smaller calls need that memory.
        for call in smaller:
            self._run_call(call, cancelled, batch)

    def _step_callback(
        self,
        timer: CallTimer,
        reporter: StepReporter,
        cancelled: threading.Event,
        parts: list[CallPart],
    ) -> StepCallback:
        """`callback_on_step_end` for one call (see the module's docstring)."""
        asked_steps = parts[0].job.num_inference_steps

        def on_step_end(pipeline, step: int, _timestep, callback_kwargs: dict[str, Any]):
            timer.step_ended(step)
            with self._steps_lock:
                self.steps_run += 1
            self.work.step_done(parts)
            if cancelled.is_set():
                raise GenerationCancelled()
            # Edits run fewer steps than asked (num_inference_steps x strength).
            total = getattr(pipeline, "_num_timesteps", None) or asked_steps
            reporter.step_done(step + 1, total, callback_kwargs["latents"])
            return callback_kwargs

        return on_step_end

    def _call(
        self, parts: list[CallPart], cancelled: threading.Event
    ) -> tuple[list[np.ndarray], CallTimes]:
        """One pipeline call over `parts`: their images as uint8 arrays in order, and how
        long the call's phases took."""
        if cancelled.is_set():
            raise GenerationCancelled()
        timer = CallTimer()
        jobs = [part.job for part in parts]
        first = jobs[0]
        # A view per call: a failed call may leave its scheduler half-way.
        view = self._pipelines.view(first.task)
        reporter = StepReporter(
            parts,
            self._previewer,
            spatial=functools.partial(spatial_latents, view, first.width, first.height),
        )
        on_step_end = self._step_callback(timer, reporter, cancelled, parts)
        view.encode_prompt = timer.timed_encode_prompt(view.encode_prompt)
        arguments = pipeline_arguments(jobs, call_parameters(type(view)), on_step_end)
        # A cached denoiser keeps this call's cache state apart from concurrent calls'.
        with call_scope(view):
            pixels = list(to_uint8(view(**arguments).images))
        times = timer.finished()
        if self._metrics is not None:
            self._metrics.batch_finished(
                images=len(pixels),
                generate_s=times.generate_s,
                steps=times.steps,
                denoise_s=times.denoise_s,
            )
        return pixels, times
