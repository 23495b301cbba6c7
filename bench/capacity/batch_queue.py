"""A simulated replica's batch queue, as `deployments/generator/calls/batching.py` runs it (the
rules that decide when a worker starts which batch; its adapters and cancellations left out):

- a job joins the first waiting batch of its kind (size and steps) with room for its images,
  else a new batch, so batches form in arrival order per kind;
- a free worker starts a full batch first, then the oldest other one: at once when no call
  runs, else once it has waited `max_wait_s`;
- after a batch ends, for `max_wait_s`, only a full batch starts: the others wait for as many
  new jobs as the ended batch had (its callers asking again), and the window closes early
  once they came.

Both rules cost throughput under load on a CPU replica: with the default 25 ms, a worker sits
idle after every batch that is not followed by a full one, beside calls of 0.1 to 0.5 s, and
a full batch of small images passes an older batch of large ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from bench.capacity.traces import RequestKind

J = TypeVar("J")


@dataclass(eq=False)
class Batch(Generic[J]):
    kind: RequestKind
    created: float
    jobs: list[J] = field(default_factory=list)
    images: int = 0


class SimulatedBatchQueue(Generic[J]):
    """The simulation's stand-in for the service's `BatchQueue`: which batch starts when, in
    simulated time."""

    def __init__(self, max_wait_s: float, capacity: Callable[[RequestKind], int]) -> None:
        self.max_wait_s = max_wait_s
        self._capacity = capacity  # most images a batch of a kind holds
        self.pending: list[Batch[J]] = []
        self._regroup_jobs = 0
        self._regroup_until = 0.0

    def add(self, job: J, kind: RequestKind, now: float) -> None:
        key = (kind.size, kind.steps)
        capacity = self._capacity(kind)
        for batch in self.pending:
            same = (batch.kind.size, batch.kind.steps) == key
            if same and batch.images + kind.images <= capacity:
                break
        else:
            batch = Batch(kind, now)
            self.pending.append(batch)
        batch.jobs.append(job)
        batch.images += kind.images
        self._regroup_jobs = max(0, self._regroup_jobs - 1)

    def _full(self, batch: Batch[J]) -> bool:
        return batch.images >= self._capacity(batch.kind)

    def _regrouping(self, now: float) -> bool:
        return self._regroup_jobs > 0 and now < self._regroup_until

    def take(self, now: float, running: int) -> Batch[J] | None:
        """The batch a free worker starts now (removed from the queue), if any."""
        ready = [batch for batch in self.pending if self._full(batch)]
        if not ready and not self._regrouping(now):
            ready = [
                batch
                for batch in self.pending
                if running == 0 or now - batch.created >= self.max_wait_s - 1e-9
            ]
        if not ready:
            return None
        self.pending.remove(ready[0])
        return ready[0]

    def finished(self, jobs: int, now: float) -> None:
        """A batch of `jobs` ended: its callers' window opens (or grows, if one is open)."""
        if self._regrouping(now):
            self._regroup_jobs += jobs
        else:
            self._regroup_jobs, self._regroup_until = jobs, now + self.max_wait_s

    def ready_at(self, now: float, running: int) -> float | None:
        """When a waiting batch may start, with a worker free and no job arriving."""
        if not self.pending:
            return None
        oldest = min(batch.created for batch in self.pending)
        at = oldest + self.max_wait_s if running else now
        if self._regrouping(now):
            at = max(at, self._regroup_until)
        return at
