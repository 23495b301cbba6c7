"""The simulated service's parts (`simulation.py` moves them): a generator replica's
settings and state, the jobs it holds, its pipeline calls, and the set of replicas with room
that the router draws from."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from bench.capacity.autoscaler import PushedSeries
from bench.capacity.batch_queue import SimulatedBatchQueue
from bench.capacity.traces import Arrival, RequestKind


class RoomSet:
    """A set that draws random members in O(1): the router's candidates."""

    def __init__(self) -> None:
        self._items: list[Replica] = []
        self._index: dict[int, int] = {}

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, item: Replica) -> None:
        if id(item) not in self._index:
            self._index[id(item)] = len(self._items)
            self._items.append(item)

    def discard(self, item: Replica) -> None:
        index = self._index.pop(id(item), None)
        if index is None:
            return
        last = self._items.pop()
        if index < len(self._items):
            self._items[index] = last
            self._index[id(last)] = index

    def sample(self, rng: random.Random, count: int) -> list[Replica]:
        if len(self._items) <= count:
            return list(self._items)
        return rng.sample(self._items, count)


@dataclass(frozen=True)
class ReplicaSettings:
    """A generator replica's Serve options and engine settings, and how long it takes to
    start (from the scale-up decision to RUNNING)."""

    max_ongoing_requests: int = 4
    max_queued_requests: int = 64  # -1: no limit
    worker_threads: int = 1
    max_batch_images: int = 4
    max_batch_pixels: int = 8 * 256 * 256
    start_s: float = 10.0
    max_wait_ms: float = 25.0  # the batch queue's (`BatchingConfig.max_wait_ms`)

    def images_per_batch(self, kind: RequestKind) -> int:
        per_call = max(1, self.max_batch_pixels // (kind.width * kind.height))
        return min(self.max_batch_images, per_call)


@dataclass
class RequestRecord:
    arrival: Arrival
    status: str = "pending"  # "ok", "rejected", or "pending" at the end
    done: float | None = None
    latency_s: float | None = None
    call_factor: float | None = None  # its call's wall seconds over its standalone ones
    routed: float | None = None  # when it reached a replica (left the handle)
    call_began: float | None = None  # when its call began on that replica
    overhead_s: float = 0.0  # its seconds outside the replica (added after its call)


@dataclass(eq=False)
class Call:
    """A pipeline call in progress: `work_s` standalone seconds, `done_s` of them run by
    `since`, from when it runs at `factor` (wall seconds per standalone second)."""

    replica: Replica
    batch: list[Job]
    work_s: float
    fixed_s: float
    since: float
    factor: float
    done_s: float = 0.0
    version: int = 0
    warm: float = 1.0  # its replica's warm-up factor (`Contention.warm`), on top
    began: float = 0.0

    def progress(self, now: float) -> float:
        return min(self.work_s, self.done_s + (now - self.since) / self.factor)


@dataclass
class Job:
    record: RequestRecord
    replica: Replica
    call: Call | None = None

    @property
    def kind(self) -> RequestKind:
        return self.record.arrival.kind

    def remaining_work(self, now: float) -> float:
        """Steps x pixels still to run: all while waiting; during the call, less the share
        of its denoising part gone by (half its fixed cost before the steps, half after)."""
        if self.call is None:
            return float(self.kind.work)
        denoise_s = self.call.work_s - self.call.fixed_s
        if denoise_s <= 0:
            return 0.0
        elapsed = self.call.progress(now) - self.call.fixed_s / 2
        return float(self.kind.work) * (1.0 - min(1.0, max(0.0, elapsed / denoise_s)))


@dataclass(eq=False)
class Replica:
    id: str
    state: str  # "starting", "running", "stopping", "gone"
    created: float
    ongoing: list[Job] = field(default_factory=list)
    batches: SimulatedBatchQueue[Job] | None = None  # its jobs waiting for a worker
    timer: int = 0  # the batch queue's wake-up armed last (older ones are void)
    busy_workers: int = 0
    served: int = 0  # calls it has begun
    initial: bool = False  # up (and idle) before the trace
    # Its record_autoscaling_stats series in the window, and what it last pushed of them.
    recorded: list[tuple[float, float, float]] = field(default_factory=list)
    pushed_work: PushedSeries | None = None
    pushed_jobs: PushedSeries | None = None
