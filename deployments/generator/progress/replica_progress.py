"""What a replica has done and holds, kept in one place that both of its paths report to.

The request-level calls (`calls/call_runner.py`) and the continuous loop (`loop/`) each
count the denoising steps they run, take each step's work off the held work the autoscaling
policy reads (`work_meter.py`), record the images of each batch or step, and tell the
metrics when a call or a loop job is done; a device failure on either path marks the replica
broken until Serve replaces it. They record it here, and the front (`engine.py`, the
deployment's health check and counters) reads it here: neither path calls back up into the
front.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from deployments.generator.progress.work_meter import HeldPart, WorkMeter
from deployments.jobs import GeneratedImages, ReplicaBroken

# The most recent batches' (or loop steps') image counts kept: a replica lives for weeks.
_KEPT_BATCH_SIZES = 1000


class EngineMetrics(Protocol):
    """What a replica reports, for `deployments/metrics.py` (or a test) to record."""

    def batch_finished(
        self, images: int, generate_s: float, steps: int, denoise_s: float
    ) -> None: ...

    def queue_changed(self, waiting_jobs: int) -> None: ...


class ReplicaProgress:
    """Steps run, batch sizes, held work and the device's health; safe from any thread."""

    def __init__(self, metrics: EngineMetrics | None = None) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._steps_run = 0
        self._broken: BaseException | None = None
        # The steps x pixels of the jobs between their submission and their answer.
        self.work = WorkMeter()
        # Images in each of the most recent request-level batches and loop steps.
        self.batch_sizes: deque[int] = deque(maxlen=_KEPT_BATCH_SIZES)
        # The loop's forwards: rows run in all, and of them padding (a compiled denoiser's
        # steps rounded up to a warmed row count, `loop/row_buckets.py`).
        self._loop_rows = 0
        self._padding_rows = 0

    @property
    def steps_run(self) -> int:
        """Denoising steps completed by every call and loop step so far."""
        with self._lock:
            return self._steps_run

    @property
    def queue_changed(self) -> Callable[[int], None] | None:
        """What the batch queue tells when its waiting jobs may have changed, if anything."""
        return self._metrics.queue_changed if self._metrics is not None else None

    def step_done(self, parts: Iterable[HeldPart], in_loop: bool = False) -> None:
        """One denoising step of a call (or of the loop) ran over `parts`."""
        with self._lock:
            self._steps_run += 1
        self.work.step_done(parts, in_loop)

    def loop_forward(self, rows: int, padding: int) -> None:
        """A forward of the loop ran `rows` rows, `padding` of them padding."""
        with self._lock:
            self._loop_rows += rows
            self._padding_rows += padding

    @property
    def loop_rows(self) -> dict[str, int]:
        """Rows the loop's forwards ran so far, and how many of them were padding."""
        with self._lock:
            return {"rows": self._loop_rows, "padding": self._padding_rows}

    def loop_step_done(self, parts: list, images: int) -> None:
        """One step of the continuous loop ran: `images` images of `parts` (its jobs)."""
        self.step_done(parts, in_loop=True)
        self.batch_sizes.append(images)

    def call_finished(self, images: int, generate_s: float, steps: int, denoise_s: float) -> None:
        """A pipeline call, or a job of the loop, made `images` images."""
        if self._metrics is not None:
            self._metrics.batch_finished(
                images=images, generate_s=generate_s, steps=steps, denoise_s=denoise_s
            )

    def loop_job_done(self, job: Any, result: GeneratedImages) -> None:
        """A job of the continuous loop (`loop/loop_jobs.LoopJob`) has its images."""
        self.call_finished(
            images=len(result.images),
            generate_s=result.generate_s,
            steps=job.job.num_inference_steps,
            denoise_s=result.denoise_s,
        )

    def mark_broken(self, error: BaseException) -> None:
        """The device failed: the replica answers no more jobs until it is replaced."""
        self._broken = error

    def check_health(self) -> None:
        """Raise `ReplicaBroken` if the device failed, so that Serve replaces the replica."""
        if self._broken is not None:
            raise ReplicaBroken(f"the device failed: {type(self._broken).__name__}")
