"""The work a replica holds, in denoising steps x pixels: what its cost-aware autoscaling
policy (`deployments/autoscaling_policy.py`) scales on.

A job counts from its submission to the batch queue until its caller has its answer (or has
gone): its full cost (`job_work`) while it waits for a batch, less one step of its images'
pixels after each step its calls run. Counting the steps done costs a lock and a few
multiplications per step, nothing beside a denoising step. A call that fails and runs again
counts its steps twice; a job's remaining work stops at 0.

The same counts tell a job that cannot finish by its deadline (`scheduling/
deadline_admission.py`): the meter knows each held job's class and whether it has started,
so the work ahead of a new job is the held work of its class and higher plus what has
started, and the steps done per second of time holding
work are its replica's rate (`ServiceRate`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from deployments.autoscaling_policy import job_work
from deployments.jobs import GenerationJob
from deployments.scheduling.deadline_admission import ServiceRate


class _Queued(Protocol):
    job: GenerationJob


class HeldPart(Protocol):
    """A job's images in one pipeline call (`call_plan.CallPart`)."""

    queued: _Queued  # the held job
    job: GenerationJob  # the held job cut to the call's images


@dataclass(frozen=True)
class HeldWork:
    step_pixels: float
    jobs: int


class WorkMeter:
    """Jobs held and their remaining steps x pixels; safe to use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # By submission (the QueuedJob's identity): one job object may be submitted twice at
        # once, and two requests may send equal jobs.
        self._remaining: dict[int, float] = {}
        self._ranks: dict[int, int] = {}  # each held job's class rank
        self._started: set[int] = set()  # held jobs that have run a step: nothing passes them
        self._images: dict[int, int] = {}  # each held job's images
        self._in_loop: set[int] = set()  # started jobs in the continuous loop
        self.rate = ServiceRate()

    @contextmanager
    def holding(self, queued: _Queued) -> Iterator[None]:
        """Counts the submitted job `queued` while the block runs (its time in the batch
        queue and its calls)."""
        job = queued.job
        with self._lock:
            self._remaining[id(queued)] = work_of(job)
            self._ranks[id(queued)] = job.schedule.rank
            self._images[id(queued)] = job.num_images
            if len(self._remaining) == 1:
                self.rate.busy(True, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                del self._remaining[id(queued)]
                del self._ranks[id(queued)]
                del self._images[id(queued)]
                self._started.discard(id(queued))
                self._in_loop.discard(id(queued))
                if not self._remaining:
                    self.rate.busy(False, time.monotonic())

    def step_done(self, parts: Iterable[HeldPart], in_loop: bool = False) -> None:
        """One step of a call (or, `in_loop`, of the continuous loop) ran: each part's
        images' pixels come off its held job."""
        total = 0.0
        with self._lock:
            for part in parts:
                key = id(part.queued)
                done = part.job.width * part.job.height * part.job.num_images
                total += done
                if key in self._remaining:
                    self._remaining[key] = max(0.0, self._remaining[key] - done)
                    self._started.add(key)
                    if in_loop:
                        self._in_loop.add(key)
            self.rate.done(total, time.monotonic())

    def remaining(self, held: Iterable[_Queued]) -> float:
        """The remaining work of these held jobs (0 for one no longer held)."""
        with self._lock:
            return sum(self._remaining.get(id(queued), 0.0) for queued in held)

    def ahead_of(self, rank: int, preempting: bool = False) -> float:
        """What a new job of class `rank` waits for (aging aside): the remaining work of the
        held jobs of its class and higher, and of the started ones of any class (a started
        call is never preempted; nor is a started job in the loop, unless the loop
        is `preempting` lower classes)."""
        with self._lock:
            return sum(
                work
                for key, work in self._remaining.items()
                if self._ranks[key] <= rank or self._runs_first(key, preempting)
            )

    def images_in_flight(self, rank: int, preempting: bool = False) -> int:
        """Images of the held jobs that have started and step beside a job of class `rank`:
        what its steps share the replica's rate with."""
        with self._lock:
            return sum(
                self._images[key]
                for key in self._started
                if self._ranks[key] <= rank or self._runs_first(key, preempting)
            )

    def _runs_first(self, key: int, preempting: bool) -> bool:
        return key in self._started and not (preempting and key in self._in_loop)

    def held(self) -> HeldWork:
        with self._lock:
            return HeldWork(step_pixels=sum(self._remaining.values()), jobs=len(self._remaining))


def work_of(job: GenerationJob) -> float:
    """A job's whole cost in steps x pixels."""
    return float(
        job_work(job.width, job.height, job.num_images, job.num_inference_steps, job.strength)
    )
