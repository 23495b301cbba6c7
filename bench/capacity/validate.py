"""The simulation against the real thing: the same seeded traces replayed open-loop over
HTTP at a real local Ray cluster (two Ray nodes on this machine: the head runs the proxy
and the ingress, the second node stands in for a GPU node and runs the generator
replicas), then simulated with the service times measured on this machine's engine, the
request overhead and replica start times measured on the cluster.

    python -m bench.capacity validate    # writes bench/results/capacity-validation.json

Each case deploys its own application, replays its trace (about 75 s), waits for the
answers, polls Serve's status every half second for the generator's replica states, and
deletes the application.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.capacity.autoscaler import AutoscalingSettings
from bench.capacity.service import ServiceModel
from bench.capacity.simulation import ReplicaSettings, simulate, summarize
from bench.capacity.traces import RequestKind, Trace, burst, ramp, steady

SMALL = RequestKind("small", 64, 64, 20)
LARGE = RequestKind("large", 256, 256, 40)
MIX = [(SMALL, 3.0), (LARGE, 1.0)]
DURATION_S = 75.0
SIZES = [SMALL.size, LARGE.size]
BATCHES = [1, 2, 4]

# Short delays so that a 75 s trace sees the autoscaler act; the same fields as production.
SETTINGS = AutoscalingSettings(
    min_replicas=1,
    max_replicas=2,
    target_ongoing_requests=2,
    upscale_delay_s=3,
    downscale_delay_s=10,
    look_back_period_s=3,
    metrics_interval_s=0.5,
)
COST_AWARE = AutoscalingSettings(
    **{**SETTINGS.__dict__, "cost_target_step_pixels": 2.0 * LARGE.work}
)
REPLICA = ReplicaSettings(
    max_ongoing_requests=4,
    max_queued_requests=100,
    worker_threads=1,
    max_batch_images=4,
    max_batch_pixels=4 * 256 * 256,
)
REQUEST_TIMEOUT_S = 100.0


@dataclass(frozen=True)
class Case:
    name: str
    trace: Trace
    settings: AutoscalingSettings


def cases() -> list[Case]:
    return [
        Case("steady", steady(4.0, DURATION_S, MIX, seed=1), SETTINGS),
        Case("ramp", ramp(1.0, 5.0, DURATION_S, MIX, seed=2), SETTINGS),
        Case("burst", burst(2.0, 5.5, 20.0, 15.0, DURATION_S, MIX, seed=3), SETTINGS),
        Case(
            "burst-large (cost-aware)",
            burst(
                2.0,
                2.5,
                20.0,
                15.0,
                DURATION_S,
                [(SMALL, 1.0)],
                [(LARGE, 1.0)],
                seed=4,
                name="burst-large",
            ),
            COST_AWARE,
        ),
    ]


def app_args(settings: AutoscalingSettings | None) -> dict[str, Any]:
    """The application's args: the embedded model on the CPU, its replicas on the node with
    the `generator` resource, one pipeline call at a time each (a GPU replica's shape); with
    no `settings`, one replica and no autoscaling (the calibration's)."""
    scaling = {"num_replicas": 1} if settings is None else {}
    if settings is not None:
        scaling = {"autoscaling_config": settings.serve_config()}
    model: dict[str, Any] = {
        "id": "tiny-sd3",
        "device": "cpu",
        "default_size": SMALL.size,
        "deployment": {
            "max_ongoing_requests": REPLICA.max_ongoing_requests,
            "max_queued_requests": REPLICA.max_queued_requests,
            "graceful_shutdown_timeout_s": 30,
            "graceful_shutdown_wait_loop_s": 0.5,
            **scaling,
            # Half a CPU: one torch thread (`cpu_threads_per_call`); two fit the node.
            "ray_actor_options": {"num_cpus": 0.5, "resources": {"generator": 1}},
        },
    }
    if settings is not None and settings.cost_target_step_pixels is not None:
        model["autoscaling_policy"] = {
            "kind": "cost_aware",
            "target_step_pixels_per_replica": settings.cost_target_step_pixels,
        }
    return {
        "models": [model],
        "batching": {
            "max_batch_images": REPLICA.max_batch_images,
            "max_batch_pixels": REPLICA.max_batch_pixels,
        },
        "worker_threads": REPLICA.worker_threads,
        "request_timeout_s": REQUEST_TIMEOUT_S,
    }


@dataclass
class RealRun:
    case: str
    # (arrival s, status, done s, latency s) of each request, times from the trace's start.
    requests: list[tuple[float, str, float | None, float | None]]
    # (s, RUNNING, STARTING) of the generator, every half second.
    timeline: list[tuple[float, int, int]]
    start_times_s: list[float] = field(default_factory=list)
    # The machine's 1-minute load average when the case started and ended: other work on
    # it slows the replicas down, which the simulation does not know.
    load_average: tuple[float, float] = (0.0, 0.0)

    def summary(self, duration_s: float) -> dict[str, Any]:
        return summarize(duration_s, self.requests, [(t, n) for t, n, _ in self.timeline])


async def replay(url: str, trace: Trace) -> list[tuple[float, str, float | None, float | None]]:
    """Each arrival sent at its time (open loop), whatever the answers before it."""
    results: list[tuple[float, str, float | None, float | None]] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S + 10, limits=limits) as client:
        started = time.monotonic()

        async def send(arrival) -> None:
            body = {**arrival.kind.body(arrival.seed), "response_format": "url"}
            sent = time.monotonic() - started
            try:
                response = await client.post(url, json=body)
                status = "ok" if response.status_code == 200 else str(response.status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            done = time.monotonic() - started
            results.append((arrival.t, status, done, done - sent))

        tasks = []
        for arrival in trace.arrivals:
            delay = arrival.t - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(arrival)))
        await asyncio.gather(*tasks)
    return results


class ReplicaPoller:
    """Serve's replica states of a deployment every `interval_s`, in a thread."""

    def __init__(self, app: str, deployment: str, interval_s: float = 0.5) -> None:
        self._app, self._deployment, self._interval_s = app, deployment, interval_s
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.started = 0.0

    def _poll(self) -> None:
        from ray import serve

        while not self._stop.is_set():
            try:
                status = serve.status().applications[self._app].deployments[self._deployment]
                states = status.replica_states
                sample = (
                    round(time.monotonic() - self.started, 2),
                    states.get("RUNNING", 0),
                    states.get("STARTING", 0),
                )
                self.samples.append(sample)
            except Exception:  # the app is being deployed or deleted
                pass
            self._stop.wait(self._interval_s)

    def start(self, started: float) -> None:
        self.started = started
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def start_times(self) -> list[float]:
        """Seconds from a replica's first STARTING sample to its RUNNING one."""
        times, pending = [], []
        previous_running = previous_starting = None
        for t, running, starting in self.samples:
            if previous_starting is not None and starting > previous_starting:
                pending += [t] * (starting - previous_starting)
            if previous_running is not None and running > previous_running and pending:
                for _ in range(running - previous_running):
                    if pending:
                        times.append(round(t - pending.pop(0), 2))
            previous_running, previous_starting = running, starting
        return times


def wait_for_quiet(threshold: float = 2.5, max_wait_s: float = 300.0) -> float:
    """Wait (up to `max_wait_s`) for the machine's 1-minute load average to fall below
    `threshold`: the replicas' speed was measured on a quiet machine. Returns it."""
    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


def calibrate_on(port: int, service: ServiceModel) -> dict[str, Any]:
    """`bench/capacity/calibrate.py`'s phases: two one-replica applications, then a
    generator-only one started twice beside the first."""
    from ray import serve

    from bench.capacity import calibrate
    from deployments.generator.deployment import ImageGenerator
    from deployments.model_config import generator_deployment_name
    from serve_app import build_app, parse_args

    urls = []
    for app in ("calibrate-a", "calibrate-b"):
        serve.run(build_app(app_args(None)), name=app, route_prefix=f"/{app}")
        urls.append(f"http://127.0.0.1:{port}/{app}/v1/images/generations")
    args = parse_args(app_args(None))
    model = args.models[0]
    starter = ImageGenerator.options(
        name=generator_deployment_name(model.id), **model.deployment_options()
    ).bind(model, *args.engine_settings(model))
    filling = RequestKind("small-x4", SMALL.width, SMALL.height, SMALL.steps, images=4)
    started = calibrate.calibrate((urls[0], urls[1]), service, starter, [SMALL, LARGE], filling)
    serve.delete("calibrate-b")
    fresh = (build_app(app_args(None)), lambda name: urls[0].replace("calibrate-a", name))
    kinds = [SMALL, LARGE, filling]
    result = calibrate.finish(started, starter, "calibrate-starter", fresh, service, kinds)
    serve.delete("calibrate-a")
    return result


def run_cluster(
    selected: list[Case], service: ServiceModel
) -> tuple[list[RealRun], dict[str, Any]]:
    """Every case on one two-node cluster, after the calibration; the runs and it."""
    # Ray starts its workers at niceness 15, below the load's client and everything else on
    # the machine; at 0 they compete as equals (bench/harness/serve_run.py's SAME_PRIORITY).
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray's own spelling)
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from bench.harness.serve_run import free_port
    from deployments.model_config import generator_deployment_name
    from serve_app import build_app

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"head": 1}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, resources={"generator": SETTINGS.max_replicas})
    ray.init(address=cluster.address, log_to_driver=False)
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    runs: list[RealRun] = []
    deployment = generator_deployment_name("tiny-sd3")
    try:
        load = os.getloadavg()[0]
        calibration = calibrate_on(port, service)
        calibration["load_average"] = (round(load, 2), round(os.getloadavg()[0], 2))
        print(f"[capacity] calibrated: {calibration['contention'].slowdowns}", flush=True)
        for index, case in enumerate(selected):
            app = f"capacity-{index}"
            serve.run(
                build_app(app_args(case.settings)),
                name=app,
                route_prefix=f"/{app}",
            )
            url = f"http://127.0.0.1:{port}/{app}/v1/images/generations"
            time.sleep(case.settings.look_back_period_s)  # the last case's load forgotten
            load_before = wait_for_quiet()
            poller = ReplicaPoller(app, deployment)
            poller.start(time.monotonic())
            while not poller.samples:  # Serve's status answers before the trace starts
                time.sleep(0.1)
            # The state before the trace holds from its start.
            poller.started = time.monotonic()
            poller.samples = [(0.0, *poller.samples[-1][1:])]
            print(
                f"[capacity] {case.name}: {len(case.trace.arrivals)} requests "
                f"(load average {load_before:.2f})",
                flush=True,
            )
            requests = asyncio.run(replay(url, case.trace))
            poller.stop()
            load = (round(load_before, 2), round(os.getloadavg()[0], 2))
            timeline = [s for s in poller.samples if s[0] <= case.trace.duration_s]
            runs.append(RealRun(case.name, sorted(requests), timeline, poller.start_times(), load))
            serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return runs, calibration


def within(real: float | None, sim: float | None) -> float | None:
    """The simulation's relative error against the real figure."""
    if real is None or sim is None or real == 0:
        return None
    return round((sim - real) / real, 3)


COMPARED = ("mean_replicas", "throughput_rps", "p50_s", "p95_s")


def validate(selected: list[Case], service: ServiceModel) -> dict[str, Any]:
    """The cases on the cluster, then in the simulation with `service` (measured on this
    machine just before) and the overhead and start times measured on the cluster."""
    runs, calibration = run_cluster(selected, service)
    overhead, contention = calibration["request_overhead_s"], calibration["contention"]
    measured_starts = [t for run in runs for t in run.start_times_s]
    start_s = statistics.median(measured_starts) if measured_starts else 10.0
    service = service.with_overhead(overhead)
    replica = ReplicaSettings(**{**REPLICA.__dict__, "start_s": start_s})
    rows = []
    for case, run in zip(selected, runs, strict=True):
        sim = simulate(case.trace, service, case.settings, replica, 0, contention)
        real_summary = run.summary(case.trace.duration_s)
        sim_summary = sim.summary()
        rows.append(
            {
                "case": case.name,
                "trace": case.trace.description,
                "policy": case.settings.policy_name,
                "load_average": run.load_average,
                "real": real_summary,
                "sim": sim_summary,
                "error": {key: within(real_summary[key], sim_summary[key]) for key in COMPARED},
                "real_timeline": run.timeline,
                "real_requests": run.requests,
                "sim_timeline": [(t, n, s) for t, n, s, _ in sim.timeline],
                "sim_decisions": sim.decisions,
            }
        )
    data = {
        "nodes": "two Ray nodes on one 2-core machine (head: proxy, ingress; worker: generators)",
        "service": service.to_json(),
        "replica": replica.__dict__,
        "start_times_s": measured_starts,
        "request_overhead_s": overhead,
        "contention": contention.to_json(),
        "calibration": {k: v for k, v in calibration.items() if k != "contention"},
        "settings": {case.name: case.settings.__dict__ for case in selected},
        "cases": rows,
    }
    data["speed_fit"] = speed_fit(data)
    return data


def speed_fit(data: dict[str, Any], factors: int = 31) -> list[dict[str, Any]]:
    """A diagnostic, not a prediction: for each case, the one factor on every service time
    (0.70 to 2.20, on top of the calibrated contention) whose simulation comes closest to
    the real p50, and the four figures then. Near 1, the calibration explains the case; if
    one speed explains all four figures, the model's shape holds and the miss was speed."""
    from bench.capacity.contention import Contention
    from bench.capacity.service import CallCost

    contention = Contention.from_json(data.get("contention"))
    base = ServiceModel.from_json(data["service"])
    replica = ReplicaSettings(**data["replica"])
    by_name = {case.name: case for case in cases()}
    fits = []
    for row in data["cases"]:
        case, real = by_name[row["case"]], row["real"]
        best: tuple[float, float, dict[str, Any]] | None = None
        for index in range(factors):
            factor = round(0.7 + index * 0.05, 2)
            costs = {
                key: CallCost(cost.fixed_s * factor, cost.per_step_s * factor)
                for key, cost in base.costs.items()
            }
            slowed = ServiceModel(costs, base.source, base.request_overhead_s)
            run = simulate(case.trace, slowed, case.settings, replica, 0, contention)
            summary = run.summary()
            miss = abs(within(real["p50_s"], summary["p50_s"]) or 0.0)
            if best is None or miss < best[0]:
                best = (miss, factor, summary)
        assert best is not None
        _, factor, summary = best
        fits.append(
            {
                "case": row["case"],
                "speed_factor": factor,
                "sim": {key: summary[key] for key in COMPARED},
                "error": {key: within(real[key], summary[key]) for key in COMPARED},
            }
        )
    return fits
