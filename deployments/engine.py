"""The generation engine of a replica: jobs run on per-request pipeline views in worker threads.

`ImageEngine.generate` is a coroutine: the replica's event loop keeps accepting requests
while a bounded pool of threads runs the pipeline (torch releases the GIL in its kernels).
Cancelling the coroutine (the client went away, or the request timed out) cannot stop a
thread, so the engine tells the thread through the pipeline's step callback, which raises
at the next denoising step; a job still waiting for a thread is dropped before it starts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from diffusers import DiffusionPipeline

from deployments.jobs import GeneratedImages, GenerationJob
from deployments.pipelines import RequestPipelines

logger = logging.getLogger("ray.serve")


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
    def __init__(self, pipeline: DiffusionPipeline, worker_threads: int) -> None:
        self._pipelines = RequestPipelines(pipeline)
        self._pool = ThreadPoolExecutor(worker_threads, thread_name_prefix="generate")
        self._broken: BaseException | None = None
        self.steps_run = 0  # denoising steps completed by all jobs; tests read it

    @property
    def shared_pipeline(self) -> DiffusionPipeline:
        return self._pipelines.shared

    def check_health(self) -> None:
        """Raise if the replica can no longer generate, so that Serve replaces it."""
        if self._broken is not None:
            raise ReplicaBroken(f"the device failed: {type(self._broken).__name__}")

    async def generate(self, job: GenerationJob) -> GeneratedImages:
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._run, job, cancelled)
        try:
            return await future
        except asyncio.CancelledError:
            # A queued job never starts (the executor drops a cancelled future); a running
            # one stops at its next step.
            cancelled.set()
            logger.info("request %s cancelled; stopping its generation", job.request_id)
            raise

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: GenerationJob, cancelled: threading.Event) -> GeneratedImages:
        if cancelled.is_set():
            raise GenerationCancelled()
        started = time.perf_counter()
        pipeline = self._pipelines.view()
        # One generator per image, on the CPU: each image's noise depends only on its own seed
        # (not on its batch neighbours), and a seed gives the same noise on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds]
        n = job.num_images

        def on_step_end(_pipeline, _step, _timestep, callback_kwargs):
            self.steps_run += 1
            if cancelled.is_set():
                raise GenerationCancelled()
            return callback_kwargs

        try:
            output = pipeline(
                prompt=[job.prompt] * n,
                negative_prompt=None if job.negative_prompt is None else [job.negative_prompt] * n,
                width=job.width,
                height=job.height,
                num_inference_steps=job.num_inference_steps,
                guidance_scale=job.guidance_scale,
                generator=generators,
                output_type="np",
                callback_on_step_end=on_step_end,
            )
        except GenerationCancelled:
            raise
        except Exception as error:
            if _is_device_failure(error):
                self._broken = error
            raise
        pixels = _to_uint8(output.images)
        return GeneratedImages(
            images=list(pixels),
            seeds=job.seeds,
            denoise_s=time.perf_counter() - started,
        )


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output in [0, 1] floats to uint8, rounding the same way everywhere."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
