"""A job in the continuous loop (`denoise_loop.py`): its images on their way, what it
answers, and what its lane tells the engine."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from deployments.generator.calls.batching import QueuedJob
from deployments.generator.calls.call_plan import is_out_of_memory
from deployments.generator.loop.families import ImageState
from deployments.generator.progress.previews import JobReporter
from deployments.jobs import GeneratedImages, GenerationJob, GenerationOutOfMemory, Screen

logger = logging.getLogger("ray.serve")

Size = tuple[int, int]


@dataclass(eq=False)
class LoopJob:
    """A submitted job in a lane, from its arrival to its answer."""

    queued: QueuedJob
    # Called from the lane's thread with the job's images or its failure.
    deliver: Callable[[GeneratedImages | BaseException], None]
    images: list[ImageState] = field(default_factory=list)
    reporter: JobReporter | None = None
    joined: float = 0.0  # `time.perf_counter()` when it joined the loop
    text_encode_s: float = 0.0
    denoise_s: float = 0.0
    largest_step: int = 0  # most images in one of its steps
    result_ready: GeneratedImages | None = None  # decoded, not answered yet

    @property
    def job(self) -> GenerationJob:  # also the work meter's part: all of it runs each step
        return self.queued.job

    @property
    def size(self) -> Size:
        return (self.job.width, self.job.height)

    @property
    def gone(self) -> bool:
        return self.queued.abandoned.is_set()

    def result(self, pixels: list[np.ndarray], decode_s: float) -> GeneratedImages:
        """Its images, with where its time went: `queue_s` until it joined the loop,
        `generate_s` from then to its images."""
        return GeneratedImages(
            images=pixels,
            seeds=self.job.seeds,
            generate_s=time.perf_counter() - self.joined,
            batch_images=self.largest_step,
            queue_s=self.joined - self.queued.submitted,
            text_encode_s=self.text_encode_s,
            denoise_s=self.denoise_s,
            decode_s=decode_s,
        )

    def failure(self, error: Exception) -> Exception:
        """What the job fails with when `error` is its own (it failed alone): out of
        memory becomes `GenerationOutOfMemory` (retryable); anything else is logged with its
        traceback and kept without it (the frames hold the failed step's tensors)."""
        if is_out_of_memory(error):
            return GenerationOutOfMemory(
                f"{self.job.num_images} {self.job.size} image(s) ran out of device memory in "
                "the loop, even alone"
            )
        logger.warning("request %s failed alone in the loop", self.job.request_id, exc_info=error)
        return error.with_traceback(None)


@dataclass
class LaneHooks:
    """What a lane tells its engine, and asks it."""

    capacity: Callable[[int, int], int]  # most images of a size in one step
    step_done: Callable[[list[LoopJob], int], None]  # (the step's jobs, its images)
    job_done: Callable[[LoopJob, GeneratedImages], None]
    broken: Callable[[BaseException], bool]  # True: a device failure (the replica is done)
    others_waiting: Callable[[], bool]  # request-level work waits for a thread
    # A done job's result as it is answered (the safety gate's `screen`: it may block it).
    screen: Screen = field(default=lambda _job, result: result)
    # What a waiting job fails with instead of joining, if it can no longer finish by its
    # deadline (None: it may join).
    late: Callable[[GenerationJob], Exception | None] = field(default=lambda _job: None)
    # A forward ran (its rows, of them padding: `row_buckets.py`).
    forward_done: Callable[[int, int], None] = field(default=lambda _rows, _padding: None)
