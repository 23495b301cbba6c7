"""The request-level path's worker: a batch of jobs as pipeline calls on per-call views.

The batch queue (`batching.py`) hands `CallRunner.run_batch` a batch in a worker thread.
Each call runs on its own pipeline view (`model/pipelines.py`), with the arguments of
`call_arguments.py`. A call that fails for a reason of its own (one job's bad prompt,
running out of memory) runs again in smaller calls, so that a bad job fails alone
(`call_plan.py`); only a broken device fails the replica. Cancelling the caller's coroutine
(the client went away, the request timed out) cannot stop a thread, so a running batch whose
jobs are all cancelled is told through the pipeline's step callback, which raises at the next
denoising step.

The step callback also feeds streamed jobs (progress, and previews from a job's slice of the
latents, `progress/previews.py`), times each call's phases for the logs and metrics
(`call_timing.py`), and records each step in the replica's progress
(`progress/replica_progress.py`: steps run, the held work the autoscaler reads).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from typing import Any

import numpy as np
import torch

from deployments.config.model_config import BatchingConfig
from deployments.generator.adapters.adapter_gate import CallAbandoned
from deployments.generator.adapters.adapter_store import AdapterStore
from deployments.generator.calls.batching import QueuedJob, adapter_key
from deployments.generator.calls.call_arguments import StepCallback, pipeline_arguments
from deployments.generator.calls.call_plan import BatchRun, CallPart, is_out_of_memory
from deployments.generator.calls.call_timing import CallTimer, CallTimes
from deployments.generator.model.cache_hooks import call_scope
from deployments.generator.model.components import to_uint8
from deployments.generator.model.pipelines import RequestPipelines, call_parameters
from deployments.generator.progress.previews import (
    LatentPreviewer,
    StepReporter,
    spatial_latents,
)
from deployments.generator.progress.replica_progress import ReplicaProgress
from deployments.jobs import (
    GeneratedImages,
    GenerationJob,
    GenerationOutOfMemory,
    ReplicaBroken,
    Screen,
)

logger = logging.getLogger("ray.serve")


class GenerationCancelled(Exception):
    """Raised inside the worker thread to stop a job whose caller is gone."""


def is_device_failure(error: BaseException) -> bool:
    """Whether `error` leaves the device unusable, so that only a new process recovers."""
    # torch raises AcceleratorError (a RuntimeError) for CUDA errors; after one the CUDA
    # context is unusable. Out-of-memory is not one of them ("CUDA error: out of memory"
    # leaves the context usable): its call is split and rerun.
    if is_out_of_memory(error):
        return False
    if isinstance(error, ReplicaBroken):  # a parallel replica's rank group failed, say
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and "CUDA error" in str(error)


class CallRunner:
    """Runs batches of compatible jobs on `pipelines`' views, recording in `progress`. A call
    holds at most `batching.max_batch_pixels` pixels, or one image: a larger job runs in
    several. With `adapters`, calls with different adapter sets never overlap
    (`adapters/adapter_gate.py`)."""

    def __init__(
        self,
        pipelines: RequestPipelines,
        previewer: LatentPreviewer | None,
        batching: BatchingConfig,
        adapters: AdapterStore | None,
        progress: ReplicaProgress,
        screen: Screen | None = None,
    ) -> None:
        """`screen`, if given, passes on each job's result as it leaves (the safety gate)."""
        self._pipelines = pipelines
        self._screen = screen
        self._previewer = previewer
        self._batching = batching
        self._adapters = adapters
        self._progress = progress

    def device_failed(self, error: BaseException) -> bool:
        """Whether `error` broke the device; if so the replica is marked broken."""
        if is_device_failure(error):
            self._progress.mark_broken(error)
            return True
        return False

    def run_batch(
        self, queued: list[QueuedJob], cancelled: threading.Event
    ) -> list[GeneratedImages | Exception]:
        """Runs compatible jobs (see `batch_key`) in one pipeline call, or more where a job
        is too large for one or a call fails (see `call_plan.py`): each job's images or the
        exception it fails with, in job order."""
        if cancelled.is_set():
            raise GenerationCancelled()
        first = queued[0].job
        capacity = self._batching.images_per_call(first.width, first.height)
        adapters = adapter_key(first.adapters)  # the batch's (its key has them)
        if self._adapters is None:  # then no job has adapters (the engine stages them)
            gate = contextlib.nullcontext()
        else:
            # Held across the batch's calls: no call with another adapter set overlaps them.
            gate = self._adapters.gate.enter(adapters, cancelled)
        try:
            with gate:
                batch = BatchRun(queued, capacity, started=time.perf_counter())
                for parts in batch.planned_calls():
                    self._run_call(parts, cancelled, batch)
        except CallAbandoned:
            raise GenerationCancelled() from None
        results = batch.results()
        if self._screen is None:
            return results
        pairs = zip(queued, results, strict=True)
        return [self._screened(entry.job, result) for entry, result in pairs]

    def _screened(
        self, job: GenerationJob, result: GeneratedImages | Exception
    ) -> GeneratedImages | Exception:
        """The job's result through the safety gate; a gate that fails fails this job alone
        (out of memory: the retryable `GenerationOutOfMemory`), or every job of the batch
        and the replica if it broke the device."""
        try:
            return self._screen(job, result)
        except Exception as error:
            if self.device_failed(error):
                raise ReplicaBroken(f"the device failed: {type(error).__name__}") from error
            logger.warning("request %s: the safety check failed", job.request_id, exc_info=error)
            if is_out_of_memory(error):
                return GenerationOutOfMemory("the safety check ran out of device memory")
            return error.with_traceback(None)

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
            if self.device_failed(error):
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
            self._progress.step_done(parts)
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
        true_cfg = self._pipelines.guidance == "true-cfg"
        arguments = pipeline_arguments(jobs, call_parameters(type(view)), on_step_end, true_cfg)
        # A cached denoiser keeps this call's cache state apart from concurrent calls'.
        with call_scope(view):
            pixels = list(to_uint8(view(**arguments).images))
        times = timer.finished()
        self._progress.call_finished(
            images=len(pixels),
            generate_s=times.generate_s,
            steps=times.steps,
            denoise_s=times.denoise_s,
        )
        return pixels, times
