"""A discrete-event model of the service under a trace (SimPy): the handle that routes
requests, generator replicas that start, batch, run and stop (their parts in
`replicas.py`), and Serve's autoscaler deciding every control-loop tick from the metrics
the handle and the replicas report (`controller.py`, on `autoscaler.py`'s model of Ray).

What it models of the service:
- the handle (the ingress's, one): a request goes to the less loaded of two random running
  replicas with room (`max_ongoing_requests`), as Serve's power-of-two-choices router does;
  with none, it waits at the handle, and beyond `max_queued_requests` waiting it is refused
  (503); waiting requests are routed by Ray's routing tasks, which retry with a backoff
  of up to 0.5 s, so a slot freed on a replica waits for the next retry; each task routes
  its own request (the oldest not yet taken when it began), so a request whose task has
  backed off to 0.5 s is passed by a later one whose fresh task retries sooner;
- a replica: `worker_threads` pipeline calls at a time (a GPU replica runs one); its jobs
  wait in batches of one size and steps up to `BatchingConfig.images_per_batch`, started
  as the service's batch queue starts them (`batch_queue.py`: full ones first, and after
  a batch ends a `max_wait_ms` window for its callers); a call lasts what the service
  model says for its size, steps and images;
- the work a replica reports to the cost-aware policy: every held job's steps x pixels,
  less the steps its call has run (the steps spread evenly over the call's denoising part);
- a new replica is RUNNING `start_s` after the decision; a replica scaled down takes no new
  requests and goes once its requests are answered; the newest go first;
- a request's latency is from its arrival to its call's end, plus the service model's
  `request_overhead_s` (the proxy, the ingress, encoding);
- contention for shared cores, where it is given (`bench/capacity/contention.py`, the
  validation's stand-in only): every call runs its standalone seconds times the factor of
  the moment (by calls running, replicas starting and requests waiting at the handle),
  recomputed whenever one of them changes; and a replica's first calls slower again by
  its measured warm-up (`Contention.warm`). Left out: the ingress's and proxy's own
  capacity, Ray's scheduling delays.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any

import simpy

from bench.capacity.autoscaler import AutoscalingSettings
from bench.capacity.batch_queue import SimulatedBatchQueue
from bench.capacity.contention import NONE, Contention
from bench.capacity.controller import ServeController
from bench.capacity.figures import summarize
from bench.capacity.replicas import Call, Job, Replica, ReplicaSettings, RequestRecord, RoomSet
from bench.capacity.service import ServiceModel
from bench.capacity.traces import Trace

__all__ = ["ReplicaSettings", "SimResult", "Simulation", "simulate"]

TIMELINE_INTERVAL_S = 0.5
# Ray's router (ray.serve._private.constants, request_router.py): its retry backoff while no
# replica has room, and its cap on routing tasks.
ROUTER_INITIAL_BACKOFF_S = 0.025  # RAY_SERVE_ROUTER_RETRY_INITIAL_BACKOFF_S
ROUTER_MAX_BACKOFF_S = 0.5  # RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S; the multiplier is 2
MAX_ROUTING_TASKS = 50  # RequestRouter.max_num_routing_tasks_cap


@dataclass
class SimResult:
    trace: Trace
    settings: AutoscalingSettings
    requests: list[RequestRecord]
    # (time, running replicas, starting replicas, target) every TIMELINE_INTERVAL_S.
    timeline: list[tuple[float, int, int, int]]
    decisions: list[tuple[float, int, int]]  # (time, old target, new target)

    def summary(self) -> dict[str, Any]:
        return summarize(
            self.trace.duration_s,
            [(r.arrival.t, r.status, r.done, r.latency_s) for r in self.requests],
            [(t, running) for t, running, _, _ in self.timeline],
        )


class Simulation:
    def __init__(
        self,
        trace: Trace,
        service: ServiceModel,
        autoscaling: AutoscalingSettings,
        replica: ReplicaSettings,
        seed: int = 0,
        drain_s: float = 120.0,
        contention: Contention = NONE,
    ) -> None:
        self.trace = trace
        self.service = service
        self.contention = contention
        self.calls: dict[Call, None] = {}  # running calls, in order (O(1) removal)
        self.settings = autoscaling
        self.replica = replica
        self.drain_s = drain_s
        self.env = simpy.Environment()
        self.rng = random.Random(seed)
        # The service's spread draws from a stream of its own: a model with spread routes
        # and scales on the same draws as one without.
        self.spread_rng = random.Random(seed + 1_000_003)
        self.replicas: list[Replica] = []
        self._room = RoomSet()  # running replicas below max_ongoing_requests
        self._running: set[Replica] = set()  # kept with _room: counted without a scan
        # Waiting at the handle: not yet taken by a routing task, and held by one.
        self.queue: deque[RequestRecord] = deque()
        self._held = 0
        self.records: list[RequestRecord] = []
        self.timeline: list[tuple[float, int, int, int]] = []
        self._serial = 0
        self._routers = 0  # routing tasks running
        self.controller = ServeController(self, autoscaling, self.env, self.rng)
        for _ in range(self.controller.target):  # the deployment is up when the trace starts
            self._add_replica(running=True)

    # --- replicas -----------------------------------------------------------------------

    def running(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == "running"]

    def _add_replica(self, running: bool = False) -> Replica:
        self._serial += 1
        replica = Replica(
            id=f"replica-{self._serial}",
            state="running" if running else "starting",
            created=self.env.now,
            initial=running and self.env.now == 0,
            batches=SimulatedBatchQueue(
                self.replica.max_wait_ms / 1000, self.replica.images_per_batch
            ),
        )
        self.replicas.append(replica)
        self._update_room(replica)
        if running:
            self.env.process(self.controller.replica_metrics(replica))
        else:
            self.env.process(self._start(replica))
        return replica

    def _start(self, replica: Replica):
        self._contend()
        yield self.env.timeout(self.replica.start_s)
        if replica.state == "starting":
            replica.state = "running"
            self._contend()
            self._update_room(replica)
            self.env.process(self.controller.replica_metrics(replica))
            self._route()

    def scale_to(self, target: int) -> None:
        active = [r for r in self.replicas if r.state in ("starting", "running")]
        for _ in range(target - len(active)):
            self._add_replica()
        if target < len(active):
            # Starting replicas first, then the newest running ones.
            order = sorted(active, key=lambda r: (r.state != "starting", -r.created))
            for replica in order[: len(active) - target]:
                replica.state = "stopping"
                self._update_room(replica)
                self._maybe_gone(replica)
            self._contend()

    def _maybe_gone(self, replica: Replica) -> None:
        if replica.state == "stopping" and not replica.ongoing:
            replica.state = "gone"
            self.replicas.remove(replica)

    # --- requests -----------------------------------------------------------------------

    def _arrivals(self):
        for arrival in self.trace.arrivals:
            if arrival.t > self.env.now:
                yield self.env.timeout(arrival.t - self.env.now)
            record = RequestRecord(arrival)
            self.records.append(record)
            if self.waiting() or not self._assign(record):
                limit = self.replica.max_queued_requests
                if limit >= 0 and self.waiting() >= limit:
                    record.status = "rejected"
                else:
                    self.queue.append(record)
                    self._contend()
                    self._route()

    def waiting(self) -> int:
        """Requests waiting at the handle (Ray's pending requests)."""
        return len(self.queue) + self._held

    def _has_room(self, replica: Replica) -> bool:
        return (
            replica.state == "running" and len(replica.ongoing) < self.replica.max_ongoing_requests
        )

    def _update_room(self, replica: Replica) -> None:
        """Called on every change of a replica's state or requests."""
        if replica.state == "running":
            self._running.add(replica)
        else:
            self._running.discard(replica)
        if self._has_room(replica):
            self._room.add(replica)
        else:
            self._room.discard(replica)

    def _assign(self, record: RequestRecord) -> bool:
        """To the less loaded of two random running replicas with room, if any."""
        if not self._room:
            return False
        two = self._room.sample(self.rng, 2)
        chosen = min(two, key=lambda r: len(r.ongoing))
        job = Job(record=record, replica=chosen)
        record.routed = self.env.now
        chosen.ongoing.append(job)
        chosen.batches.add(job, job.kind, self.env.now)
        self._update_room(chosen)
        self._dispatch(chosen)
        return True

    def _routing_tasks_wanted(self) -> int:
        """Ray's `target_num_routing_tasks`: one a waiting request, up to two a running
        replica and `MAX_ROUTING_TASKS` in all."""
        return min(self.waiting(), MAX_ROUTING_TASKS, 2 * max(1, len(self._running)))

    def _route(self) -> None:
        """Routing tasks for the requests waiting at the handle, as many as Ray runs."""
        while self._routers < self._routing_tasks_wanted():
            self._routers += 1
            self.env.process(self._routing_task())

    def _routing_task(self):
        """One of Ray's routing tasks (`_fulfill_pending_requests`): it takes the oldest
        request no task holds and routes that one (`_fulfill_next_pending_request` matches
        its id); while no replica has room it retries after a backoff from 25 ms doubling
        to 0.5 s, so a freed slot goes to the task that retries first; then the next
        request, with a fresh backoff, while the waiting requests want this many tasks."""
        try:
            while self.queue and self._routers <= self._routing_tasks_wanted():
                record = self.queue.popleft()
                self._held += 1
                attempt = 0
                while not self._room:
                    yield self.env.timeout(
                        min(ROUTER_INITIAL_BACKOFF_S * 2**attempt, ROUTER_MAX_BACKOFF_S)
                    )
                    attempt = min(attempt + 1, 10)  # at the cap long before; no overflow
                self._held -= 1
                self._assign(record)
                self._contend()
        finally:
            self._routers -= 1

    def _dispatch(self, replica: Replica) -> None:
        """Free workers start the batches the queue has ready; if one waits, a wake-up."""
        now, workers = self.env.now, self.replica.worker_threads
        while replica.busy_workers < workers:
            batch = replica.batches.take(now, replica.busy_workers)
            if batch is None:
                break
            replica.busy_workers += 1
            capacity = self.replica.images_per_batch(batch.kind)
            self._call(replica, batch.jobs, batch.images, capacity)
        at = replica.batches.ready_at(now, replica.busy_workers)
        if replica.busy_workers < workers and at is not None:
            replica.timer += 1
            wake = self.env.timeout(max(0.0, at - now))
            wake.callbacks.append(lambda _, r=replica, v=replica.timer: self._wake(r, v))

    def _wake(self, replica: Replica, version: int) -> None:
        if version == replica.timer:  # no other wake-up armed since
            self._dispatch(replica)

    def _call(self, replica: Replica, batch: list[Job], images: int, capacity: int) -> None:
        kind = batch[0].kind
        # A job of more images than a call holds runs in several calls.
        calls = [min(capacity, images - done) for done in range(0, images, capacity)]
        spread = self.service.spread(self.spread_rng)
        seconds = spread * sum(self.service.call_s(kind.size, kind.steps, n) for n in calls)
        fixed = spread * sum(self.service.cost(kind.size, n).fixed_s for n in calls)
        warm = self.contention.warm(replica.served, replica.initial)
        replica.served += 1
        now = self.env.now
        call = Call(replica, batch, seconds, fixed, now, factor=1.0, warm=warm, began=now)
        for job in batch:
            job.call = call
        self.calls[call] = None
        self._contend(call)

    def _starting(self) -> int:
        return sum(1 for r in self.replicas if r.state == "starting")

    def _contend(self, new: Call | None = None) -> None:
        """Every call at the factor of the moment; those whose factor changed (and `new`)
        rescheduled to end when their remaining standalone seconds allow."""
        now = self.env.now
        if not self.contention.slowdowns:  # every factor 1: only `new` to schedule
            calls, shared = [new] if new is not None else [], 1.0
        else:
            calls = list(self.calls)
            shared = self.contention.factor(len(calls), self._starting(), self.waiting())
        for call in calls:
            factor = shared * call.warm
            if call is not new and call.factor == factor:
                continue
            call.done_s, call.since, call.factor = call.progress(now), now, factor
            call.version += 1
            end = self.env.timeout((call.work_s - call.done_s) * factor)
            end.callbacks.append(lambda _, c=call, v=call.version: self._ended(c, v))

    def _ended(self, call: Call, version: int) -> None:
        if call.version != version:  # rescheduled since
            return
        replica, batch = call.replica, call.batch
        del self.calls[call]
        self._contend()
        replica.busy_workers -= 1
        for job in batch:
            replica.ongoing.remove(job)
        replica.batches.finished(len(batch), self.env.now)
        self._update_room(replica)
        for job in batch:
            job.record.status = "ok"
            job.record.overhead_s = self.service.overhead_s(self.spread_rng)
            job.record.done = self.env.now + job.record.overhead_s
            job.record.latency_s = job.record.done - job.record.arrival.t
            job.record.call_factor = (self.env.now - call.began) / call.work_s
            job.record.call_began = call.began
        self._maybe_gone(replica)
        self._dispatch(replica)
        self._route()

    # --- metrics and the autoscaler -----------------------------------------------------

    def _sample(self):
        while True:
            states = [r.state for r in self.replicas]
            self.timeline.append(
                (
                    round(self.env.now, 3),
                    states.count("running"),
                    states.count("starting"),
                    self.controller.target,
                )
            )
            yield self.env.timeout(TIMELINE_INTERVAL_S)

    def run(self) -> SimResult:
        arrivals = self.env.process(self._arrivals())
        self.env.process(self.controller.handle_metrics())
        self.env.process(self.controller.control_loop())
        self.env.process(self._sample())
        self.env.run(until=arrivals)
        # Let the backlog drain, as the real run waits for its answers.
        end = self.trace.duration_s + self.drain_s
        while self.env.now < end and any(r.status == "pending" for r in self.records):
            self.env.run(until=min(end, self.env.now + 1.0))
        self.timeline = [row for row in self.timeline if row[0] <= self.trace.duration_s]
        return SimResult(
            self.trace, self.settings, self.records, self.timeline, self.controller.decisions
        )


def simulate(
    trace: Trace,
    service: ServiceModel,
    autoscaling: AutoscalingSettings,
    replica: ReplicaSettings,
    seed: int = 0,
    contention: Contention = NONE,
) -> SimResult:
    return Simulation(trace, service, autoscaling, replica, seed, contention=contention).run()
