"""The continuous engine's event-loop side: which jobs it takes, which lane runs each, and
the job's answer back on the event loop.

`ContinuousBatching` takes text-to-image jobs of a flow-matching transformer family (SD3,
FLUX) whose images fit one step's budget; everything else (edits, SDXL, a job larger than
the budget) stays on the request-level path (`calls/batching.py`). Each job goes to the lane
(`denoise_loop.Lane`, one per worker thread) with the least work left (its held jobs'
remaining steps x pixels, from the work meter: least-work-left dispatch, which keeps a
short job out of the lane a long, large one slows; the fewest images would count a
20-step 128x128 image as one 4-step 64x64 image), which starts in a worker thread if it was
idle. Its caller's cancellation (the client went away, the request timed out) marks the
job, and its images leave the loop at the next step boundary.

Lanes and request-level batches share the worker threads: the batch queue's executor is a
`CountingExecutor`, so a lane sees request-level work waiting for a thread and yields it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from deployments.config.model_config import BatchingConfig
from deployments.generator.calls.batching import QueuedJob
from deployments.generator.loop.class_gate import ClassGate
from deployments.generator.loop.denoise_loop import Lane, LaneHooks, LoopJob
from deployments.generator.loop.families import FlowFamily
from deployments.generator.loop.loop_adapters import LoopAdapters
from deployments.generator.progress.previews import LatentPreviewer
from deployments.generator.progress.work_meter import WorkMeter
from deployments.jobs import EventSink, GeneratedImages, GenerationJob


class ContinuousBatching:
    """Runs the jobs it `accepts` in `lanes` continuous loops on `pool`."""

    def __init__(
        self,
        family: FlowFamily,
        pool: ThreadPoolExecutor,
        lanes: int,
        batching: BatchingConfig,
        hooks: LaneHooks,
        work: WorkMeter,
        previewer: LatentPreviewer | None,
        adapters: LoopAdapters | None,
        pad_rows: bool = False,
    ) -> None:
        """`pad_rows`: for a compiled denoiser, each step's rows padded to a few counts
        (`row_buckets.py`)."""
        self._pool = pool
        self._batching = batching
        self._work = work
        self._adapters = adapters
        gate = ClassGate() if batching.preempt_lower_classes else None
        self._lanes = [
            Lane(family, adapters, previewer, hooks, gate, pad_rows) for _ in range(lanes)
        ]

    def accepts(self, job: GenerationJob) -> bool:
        """Text-to-image jobs whose images fit one step and whose adapters (staged by now)
        only touch the denoiser and fit the replica's adapter slots."""
        if job.task != "text-to-image":
            return False
        if job.num_images > self._batching.images_per_batch(job.width, job.height):
            return False
        return not job.adapters or (
            self._adapters is not None
            and len(job.adapters) <= self._adapters.slots  # more: one call, request-level
            and self._adapters.accepts(job.adapters)
        )

    async def submit(self, job: GenerationJob, sink: EventSink | None = None) -> GeneratedImages:
        """The job's images, once the loop has run it."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[GeneratedImages] = loop.create_future()

        def deliver(outcome: GeneratedImages | BaseException) -> None:
            loop.call_soon_threadsafe(_settle, answer, outcome)

        queued = QueuedJob(job=job, sink=sink, submitted=time.perf_counter())
        with self._work.holding(queued):
            lane = min(self._lanes, key=self._work_left)
            if lane.add(LoopJob(queued=queued, deliver=deliver)):
                self._start(lane)
            try:
                return await answer
            except asyncio.CancelledError:
                queued.abandoned.set()  # it leaves at the lane's next step boundary
                raise

    def _work_left(self, lane: Lane) -> tuple[float, int]:
        """What a job sent to `lane` waits behind: its held jobs' remaining steps x pixels
        (then its images, for lanes holding nothing)."""
        return self._work.remaining(lane.held()), lane.images

    def _start(self, lane: Lane) -> None:
        future = asyncio.get_running_loop().run_in_executor(self._pool, lane.run)
        future.add_done_callback(lambda done: self._ended(lane, done))

    def _ended(self, lane: Lane, done: asyncio.Future[bool]) -> None:
        # True: it yielded its thread to request-level work with jobs still queued; it runs
        # again behind that work. An exception has failed all of its jobs (a broken device).
        if not done.cancelled() and done.exception() is None and done.result():
            self._start(lane)


def _settle(answer: asyncio.Future[GeneratedImages], outcome: Any) -> None:
    if answer.done():  # its caller cancelled and left
        return
    if isinstance(outcome, BaseException):
        answer.set_exception(outcome)
    else:
        answer.set_result(outcome)
