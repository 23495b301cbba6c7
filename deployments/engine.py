"""The generation engine of a replica: batches of jobs on pipeline views in worker threads.

`ImageEngine.generate` is a coroutine: the replica's event loop keeps accepting requests
while a bounded pool of threads runs the pipeline (torch releases the GIL in its kernels).
Compatible jobs are grouped into one pipeline call by `deployments/batching.py`; each call
runs on its own pipeline view (see `deployments/pipelines.py`). Cancelling the coroutine (the
client went away, or the request timed out) cannot stop a thread, so a running batch whose
jobs are all cancelled is told through the pipeline's step callback, which raises at the next
denoising step; a job still waiting is simply dropped from its batch.
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

from deployments.batching import BatchQueue
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
    def __init__(
        self,
        pipeline: DiffusionPipeline,
        worker_threads: int,
        max_batch_images: int = 1,
        max_wait_s: float = 0.0,
        max_batch_pixels: int | None = None,
    ) -> None:
        self._pipelines = RequestPipelines(pipeline)
        self._pool = ThreadPoolExecutor(worker_threads, thread_name_prefix="generate")
        self._queue = BatchQueue(
            self._run_batch,
            self._pool,
            workers=worker_threads,
            max_batch_images=max_batch_images,
            max_batch_pixels=max_batch_pixels,
            max_wait_s=max_wait_s,
        )
        self._broken: BaseException | None = None
        self._steps_lock = threading.Lock()
        self.steps_run = 0  # denoising steps completed by all batches; tests read it

    def check_health(self) -> None:
        """Raise if the replica can no longer generate, so that Serve replaces it."""
        if self._broken is not None:
            raise ReplicaBroken(f"the device failed: {type(self._broken).__name__}")

    @property
    def batch_sizes(self) -> list[int]:
        """Images in each of the most recent batches, oldest first."""
        return list(self._queue.batch_sizes)

    async def generate(self, job: GenerationJob) -> GeneratedImages:
        try:
            return await self._queue.submit(job)
        except asyncio.CancelledError:
            logger.info("request %s cancelled; its generation stops", job.request_id)
            raise

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run_batch(
        self, jobs: list[GenerationJob], cancelled: threading.Event
    ) -> list[GeneratedImages]:
        """One pipeline call for compatible jobs (see `batch_key`); results in job order."""
        if cancelled.is_set():
            raise GenerationCancelled()
        started = time.perf_counter()
        first = jobs[0]
        prompts = [job.prompt for job in jobs for _ in job.seeds]
        negative_prompts = None
        if first.negative_prompt is not None:  # the same for all jobs of a batch
            negative_prompts = [job.negative_prompt for job in jobs for _ in job.seeds]
        # One generator per image, on the CPU: each image's noise depends only on its own seed
        # (not on its batch neighbours), and a seed gives the same noise on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for job in jobs for s in job.seeds]

        def on_step_end(_pipeline, _step, _timestep, callback_kwargs):
            with self._steps_lock:
                self.steps_run += 1
            if cancelled.is_set():
                raise GenerationCancelled()
            return callback_kwargs

        try:
            output = self._pipelines.view()(
                prompt=prompts,
                negative_prompt=negative_prompts,
                width=first.width,
                height=first.height,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
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
        pixels = list(_to_uint8(output.images))
        elapsed = time.perf_counter() - started
        results = []
        batch_images = len(pixels)
        for job in jobs:
            images, pixels = pixels[: job.num_images], pixels[job.num_images :]
            results.append(
                GeneratedImages(
                    images=images,
                    seeds=job.seeds,
                    generate_s=elapsed,
                    batch_images=batch_images,
                )
            )
        return results


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output in [0, 1] floats to uint8, rounding the same way everywhere."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
