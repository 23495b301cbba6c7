"""A discrete-event model of the service under a trace (SimPy): the handle that routes
requests, generator replicas that start, batch, run and stop, and Serve's autoscaler
(`bench/capacity/autoscaler.py`) deciding every control-loop tick from the metrics the
handle and the replicas report.

What it models of the service:
- the handle (the ingress's, one): a request goes to the less loaded of two random running
  replicas with room (`max_ongoing_requests`), as Serve's power-of-two-choices router does;
  with none, it waits at the handle, and beyond `max_queued_requests` waiting it is refused
  (503);
- a replica: `worker_threads` pipeline calls at a time, each an independent server (true
  on a CPU with a core per call, or a GPU replica running one call at a time); a free
  worker takes the oldest waiting job and every waiting job of the same size and steps
  that fits its batch (`BatchingConfig.images_per_batch`); a call lasts what the service
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
  its measured warm-up (`Contention.warm`, by the calls it has begun).
What it leaves out: the ingress's and proxy's own capacity, the batch queue's
`max_wait_ms` (milliseconds beside calls of a tenth of a second and more), Ray's scheduling
delays.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import simpy
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from bench.capacity.autoscaler import (
    CONTROL_LOOP_INTERVAL_S,
    AutoscalingSettings,
    DelayState,
    HandleReport,
    PushedSeries,
    decide,
    default_policy_wish,
    replica_seconds,
)
from bench.capacity.contention import NONE, Contention
from bench.capacity.service import ServiceModel
from bench.capacity.traces import Arrival, RequestKind, Trace
from deployments.autoscaling_policy import JOBS_METRIC, WORK_METRIC, CostAwarePolicy

DEPLOYMENT = DeploymentID(name="ImageGenerator:sim", app_name="sim")
TIMELINE_INTERVAL_S = 0.5


class _Sampled:
    """A set that draws random members in O(1): the router's candidates."""

    def __init__(self) -> None:
        self._items: list[_Replica] = []
        self._index: dict[int, int] = {}

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, item: _Replica) -> None:
        if id(item) not in self._index:
            self._index[id(item)] = len(self._items)
            self._items.append(item)

    def discard(self, item: _Replica) -> None:
        index = self._index.pop(id(item), None)
        if index is None:
            return
        last = self._items.pop()
        if index < len(self._items):
            self._items[index] = last
            self._index[id(last)] = index

    def sample(self, rng: random.Random, count: int) -> list[_Replica]:
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

    def images_per_batch(self, kind: RequestKind) -> int:
        per_call = max(1, self.max_batch_pixels // (kind.width * kind.height))
        return min(self.max_batch_images, per_call)


@dataclass
class RequestRecord:
    arrival: Arrival
    status: str = "pending"  # "ok", "rejected", or "pending" at the end
    done: float | None = None
    latency_s: float | None = None


@dataclass(eq=False)
class _Call:
    """A pipeline call in progress: `work_s` standalone seconds, `done_s` of them run by
    `since`, from when it runs at `factor` (wall seconds per standalone second)."""

    replica: _Replica
    batch: list[_Job]
    work_s: float
    fixed_s: float
    since: float
    factor: float
    done_s: float = 0.0
    version: int = 0
    warm: float = 1.0  # its replica's warm-up factor (`Contention.warm`), on top

    def progress(self, now: float) -> float:
        return min(self.work_s, self.done_s + (now - self.since) / self.factor)


@dataclass
class _Job:
    record: RequestRecord
    replica: _Replica
    call: _Call | None = None

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
class _Replica:
    id: str
    state: str  # "starting", "running", "stopping", "gone"
    created: float
    ongoing: list[_Job] = field(default_factory=list)
    waiting: list[_Job] = field(default_factory=list)
    busy_workers: int = 0
    served: int = 0  # calls it has begun
    initial: bool = False  # up (and idle) before the trace
    # Its record_autoscaling_stats series in the window, and what it last pushed of them.
    recorded: list[tuple[float, float, float]] = field(default_factory=list)
    pushed_work: PushedSeries | None = None
    pushed_jobs: PushedSeries | None = None


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


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(
    duration_s: float,
    requests: list[tuple[float, str, float | None, float | None]],
    running: list[tuple[float, int]],
) -> dict[str, Any]:
    """The figures compared between the simulation and the real cluster: mean running
    replicas over the trace, throughput (answered requests per second, from the start to
    the last answer), p50 and p95 latency of the answered requests, refusals, and when the
    replicas first grew."""
    ok = [(done, latency) for _, status, done, latency in requests if status == "ok"]
    latencies = [latency for _, latency in ok if latency is not None]
    last = max((done for done, _ in ok if done is not None), default=duration_s)
    first_up = next((t for t, n in running if running and n > running[0][1]), None)
    return {
        "requests": len(requests),
        "ok": len(ok),
        "rejected": sum(1 for _, status, _, _ in requests if status == "rejected"),
        "unanswered": sum(1 for _, status, _, _ in requests if status not in ("ok", "rejected")),
        "mean_replicas": round(replica_seconds(running, duration_s) / duration_s, 3),
        "max_replicas": max((n for _, n in running), default=0),
        "first_scale_up_s": first_up,
        "throughput_rps": round(len(ok) / max(last, duration_s), 3),
        "p50_s": None if not latencies else round(percentile(latencies, 50), 3),
        "p95_s": None if not latencies else round(percentile(latencies, 95), 3),
    }


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
        self.calls: dict[_Call, None] = {}  # running calls, in order (O(1) removal)
        self.settings = autoscaling
        self.replica = replica
        self.drain_s = drain_s
        self.env = simpy.Environment()
        self.rng = random.Random(seed)
        self.replicas: list[_Replica] = []
        self._room = _Sampled()  # running replicas below max_ongoing_requests
        self.queue: deque[RequestRecord] = deque()  # waiting at the handle
        self.records: list[RequestRecord] = []
        self.target = autoscaling.bounded(
            autoscaling.initial_replicas
            if autoscaling.initial_replicas is not None
            else autoscaling.min_replicas
        )
        self.delays = DelayState()
        self.handle_recorded: list[tuple[float, float | None, dict[str, float]]] = []
        self.handle_report = HandleReport()
        self.timeline: list[tuple[float, int, int, int]] = []
        self.decisions: list[tuple[float, int, int]] = []
        self._serial = 0
        self._policy = (
            CostAwarePolicy(autoscaling.cost_target_step_pixels)
            if autoscaling.cost_target_step_pixels is not None
            else None
        )
        self._config = AutoscalingConfig(**autoscaling.serve_config())
        for _ in range(self.target):  # the deployment is up when the trace starts
            self._add_replica(running=True)

    # --- replicas -----------------------------------------------------------------------

    def running(self) -> list[_Replica]:
        return [r for r in self.replicas if r.state == "running"]

    def _add_replica(self, running: bool = False) -> _Replica:
        self._serial += 1
        replica = _Replica(
            id=f"replica-{self._serial}",
            state="running" if running else "starting",
            created=self.env.now,
            initial=running and self.env.now == 0,
        )
        self.replicas.append(replica)
        self._update_room(replica)
        if running:
            self.env.process(self._replica_metrics(replica))
        else:
            self.env.process(self._start(replica))
        return replica

    def _start(self, replica: _Replica):
        self._contend()
        yield self.env.timeout(self.replica.start_s)
        if replica.state == "starting":
            replica.state = "running"
            self._contend()
            self._update_room(replica)
            self.env.process(self._replica_metrics(replica))
            self._route()

    def _scale_to(self, target: int) -> None:
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

    def _maybe_gone(self, replica: _Replica) -> None:
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
            if self.queue or not self._assign(record):
                limit = self.replica.max_queued_requests
                if limit >= 0 and len(self.queue) >= limit:
                    record.status = "rejected"
                else:
                    self.queue.append(record)
                    self._contend()

    def _has_room(self, replica: _Replica) -> bool:
        return (
            replica.state == "running" and len(replica.ongoing) < self.replica.max_ongoing_requests
        )

    def _update_room(self, replica: _Replica) -> None:
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
        job = _Job(record=record, replica=chosen)
        chosen.ongoing.append(job)
        chosen.waiting.append(job)
        self._update_room(chosen)
        self._dispatch(chosen)
        return True

    def _route(self) -> None:
        routed = bool(self.queue and self._room)
        while self.queue and self._room:
            self._assign(self.queue.popleft())
        if routed:
            self._contend()

    def _dispatch(self, replica: _Replica) -> None:
        while replica.busy_workers < self.replica.worker_threads and replica.waiting:
            first = replica.waiting[0]
            capacity = self.replica.images_per_batch(first.kind)
            batch, images = [], 0
            for job in list(replica.waiting):
                same = (job.kind.size, job.kind.steps) == (first.kind.size, first.kind.steps)
                if same and (not batch or images + job.kind.images <= capacity):
                    batch.append(job)
                    images += job.kind.images
                    replica.waiting.remove(job)
                    if images >= capacity:
                        break
            replica.busy_workers += 1
            self._call(replica, batch, images, capacity)

    def _call(self, replica: _Replica, batch: list[_Job], images: int, capacity: int) -> None:
        kind = batch[0].kind
        # A job of more images than a call holds runs in several calls.
        calls = [min(capacity, images - done) for done in range(0, images, capacity)]
        seconds = sum(self.service.call_s(kind.size, kind.steps, n) for n in calls)
        fixed = sum(self.service.cost(kind.size, n).fixed_s for n in calls)
        warm = self.contention.warm(replica.served, replica.initial)
        replica.served += 1
        call = _Call(replica, batch, seconds, fixed, self.env.now, factor=1.0, warm=warm)
        for job in batch:
            job.call = call
        self.calls[call] = None
        self._contend(call)

    def _starting(self) -> int:
        return sum(1 for r in self.replicas if r.state == "starting")

    def _contend(self, new: _Call | None = None) -> None:
        """Every call at the factor of the moment; those whose factor changed (and `new`)
        rescheduled to end when their remaining standalone seconds allow."""
        now = self.env.now
        if not self.contention.slowdowns:  # every factor 1: only `new` to schedule
            calls, shared = [new] if new is not None else [], 1.0
        else:
            calls = list(self.calls)
            shared = self.contention.factor(len(calls), self._starting(), len(self.queue))
        for call in calls:
            factor = shared * call.warm
            if call is not new and call.factor == factor:
                continue
            call.done_s, call.since, call.factor = call.progress(now), now, factor
            call.version += 1
            end = self.env.timeout((call.work_s - call.done_s) * factor)
            end.callbacks.append(lambda _, c=call, v=call.version: self._ended(c, v))

    def _ended(self, call: _Call, version: int) -> None:
        if call.version != version:  # rescheduled since
            return
        replica, batch = call.replica, call.batch
        del self.calls[call]
        self._contend()
        replica.busy_workers -= 1
        for job in batch:
            replica.ongoing.remove(job)
        self._update_room(replica)
        for job in batch:
            job.record.status = "ok"
            job.record.done = self.env.now + self.service.request_overhead_s
            job.record.latency_s = job.record.done - job.record.arrival.t
        self._maybe_gone(replica)
        self._dispatch(replica)
        self._route()

    # --- metrics and the autoscaler -----------------------------------------------------

    def _handle_metrics(self):
        """The handle's recording and pushing loops (one process, the two intervals)."""
        settings = self.settings
        next_record = self.rng.uniform(0, settings.record_interval_s)
        next_push = self.rng.uniform(0, settings.metrics_interval_s)
        while True:
            now = self.env.now
            if now >= next_record - 1e-9:
                sent = {
                    r.id: float(len(r.ongoing))
                    for r in self.replicas
                    if r.state == "running" or (r.state == "stopping" and r.ongoing)
                }
                self.handle_recorded.append((now, float(len(self.queue)), sent))
                next_record += settings.record_interval_s
            if now >= next_push - 1e-9:
                window = [
                    rec
                    for rec in self.handle_recorded
                    if rec[0] >= now - settings.look_back_period_s
                ]
                self.handle_recorded = window
                known = {r.id for r in self.replicas if r.state == "running"}
                recorded = {replica for _, _, sent in window for replica in sent}
                fresh = {
                    r.id: float(len(r.ongoing)) for r in self.replicas if r.id in known - recorded
                }
                records: list[tuple[float, float | None, dict[str, float]]] = list(window)
                if fresh:  # a replica with no point yet is sent its count now
                    records.append((now, None, fresh))
                self.handle_report = HandleReport(records)
                next_push += settings.metrics_interval_s
            yield self.env.timeout(max(0.0, min(next_record, next_push) - self.env.now))

    def _replica_metrics(self, replica: _Replica):
        """A replica's `record_autoscaling_stats` loop: record, and push every interval."""
        settings = self.settings
        next_record = self.env.now
        next_push = self.env.now + settings.metrics_interval_s
        while replica.state != "gone":
            now = self.env.now
            if now >= next_record - 1e-9:
                work = sum(job.remaining_work(now) for job in replica.ongoing)
                replica.recorded.append((now, work, float(len(replica.ongoing))))
                next_record += settings.record_interval_s
            if now >= next_push - 1e-9:
                cutoff = now - settings.look_back_period_s
                replica.recorded = [p for p in replica.recorded if p[0] >= cutoff]
                replica.pushed_work = PushedSeries.of([(t, w) for t, w, _ in replica.recorded])
                replica.pushed_jobs = PushedSeries.of([(t, j) for t, _, j in replica.recorded])
                next_push += settings.metrics_interval_s
            yield self.env.timeout(max(0.0, min(next_record, next_push) - self.env.now))

    def _wish(self, running: list[_Replica], ongoing: float) -> float:
        if self._policy is None:
            return default_policy_wish(
                ongoing, len(running), self.target, self.settings.target_ongoing_requests
            )
        now = self.env.now
        metrics: dict[str, dict[str, float]] = {WORK_METRIC: {}, JOBS_METRIC: {}}
        for r in running:
            if r.pushed_work is not None and r.pushed_jobs is not None:
                metrics[WORK_METRIC][r.id] = r.pushed_work.mean(now)
                metrics[JOBS_METRIC][r.id] = r.pushed_jobs.mean(now)
        ctx = AutoscalingContext(
            deployment_id=DEPLOYMENT,
            deployment_name=DEPLOYMENT.name,
            app_name=DEPLOYMENT.app_name,
            current_num_replicas=len(running),
            target_num_replicas=self.target,
            running_replicas=[r.id for r in running],
            total_num_requests=ongoing,
            total_queued_requests=self.handle_report.queued(now),
            aggregated_metrics=metrics,
            raw_metrics=None,
            capacity_adjusted_min_replicas=self.settings.min_replicas,
            capacity_adjusted_max_replicas=self.settings.max_replicas,
            policy_state={},
            last_scale_up_time=None,
            last_scale_down_time=None,
            current_time=now,
            config=self._config,
        )
        wish, _ = self._policy(ctx)
        return float(wish)

    def _controller(self):
        while True:
            running = self.running()
            ids = frozenset(r.id for r in running)
            ongoing = self.handle_report.ongoing(ids, self.env.now)
            cold = len(running) == 0 and ongoing > 0
            wish = None if cold else self._wish(running, ongoing)
            decision = decide(
                wish,
                current=len(running),
                target=self.target,
                total_ongoing=ongoing,
                settings=self.settings,
                delays=self.delays,
                now=self.env.now,
            )
            if decision != self.target:
                self.decisions.append((round(self.env.now, 3), self.target, decision))
                self.target = decision
                self._scale_to(decision)
            yield self.env.timeout(CONTROL_LOOP_INTERVAL_S)

    def _sample(self):
        while True:
            states = [r.state for r in self.replicas]
            self.timeline.append(
                (
                    round(self.env.now, 3),
                    states.count("running"),
                    states.count("starting"),
                    self.target,
                )
            )
            yield self.env.timeout(TIMELINE_INTERVAL_S)

    def run(self) -> SimResult:
        arrivals = self.env.process(self._arrivals())
        self.env.process(self._handle_metrics())
        self.env.process(self._controller())
        self.env.process(self._sample())
        self.env.run(until=arrivals)
        # Let the backlog drain, as the real run waits for its answers.
        end = self.trace.duration_s + self.drain_s
        while self.env.now < end and any(r.status == "pending" for r in self.records):
            self.env.run(until=min(end, self.env.now + 1.0))
        self.timeline = [row for row in self.timeline if row[0] <= self.trace.duration_s]
        return SimResult(self.trace, self.settings, self.records, self.timeline, self.decisions)


def simulate(
    trace: Trace,
    service: ServiceModel,
    autoscaling: AutoscalingSettings,
    replica: ReplicaSettings,
    seed: int = 0,
    contention: Contention = NONE,
) -> SimResult:
    return Simulation(trace, service, autoscaling, replica, seed, contention=contention).run()
