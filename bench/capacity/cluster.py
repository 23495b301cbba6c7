"""The validation's traces on a real local Ray cluster: two Ray nodes on this machine (the
head runs the proxy and the ingress, the second node stands in for a GPU node and runs the
generator replicas), after the calibration (`calibrate.py`).

Each case, and each repeat of it, deploys its own application, replays its trace open-loop
over HTTP (about 75 s), waits for the answers, polls Serve's status every half second for
the generator's replica states, and deletes the application.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.capacity.breakdown import trace_request_id
from bench.capacity.experiment import (
    LARGE,
    REQUEST_TIMEOUT_S,
    SETTINGS,
    SMALL,
    Case,
    app_args,
    pace_for,
    stretch_for,
)
from bench.capacity.figures import summarize
from bench.capacity.probe import LoggedCall, probe
from bench.capacity.service import ServiceModel
from bench.capacity.throttle import Throttle
from bench.capacity.traces import RequestKind, Trace

# How long a trace waits for its application to be back at `min_replicas` after the probe:
# Serve's downscale delay and look-back, and some.
SETTLE_MAX_S = 120.0
PROBE_TRIES = 3  # probes made before a trace, should a replica start during them


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
    repeat: int = 0  # which of the case's runs
    # The "1 call" factor measured on its first replica just before the trace
    # (`probe.py`): the machine's speed then.
    probe: dict[str, Any] = field(default_factory=dict)
    # Each request as the ingress logged it (`server_timings`), the probe's too.
    server: list[list[Any]] = field(default_factory=list)
    # The trace it ran: its case at this pace (from its probe) and stretch (`Case.at`).
    pace: float = 1.0
    stretch: float = 1.0

    def summary(self, duration_s: float) -> dict[str, Any]:
        return summarize(duration_s, self.requests, [(t, n) for t, n, _ in self.timeline])


async def replay(url: str, trace: Trace) -> list[tuple[float, str, float | None, float | None]]:
    """Each arrival sent at its time (open loop), whatever the answers before it."""
    results: list[tuple[float, str, float | None, float | None]] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S + 10, limits=limits) as client:
        started = time.monotonic()

        async def send(index: int, arrival) -> None:
            body = {**arrival.kind.body(arrival.seed), "response_format": "url"}
            headers = {"x-request-id": trace_request_id(index)}  # joins the ingress's log
            sent = time.monotonic() - started
            try:
                response = await client.post(url, json=body, headers=headers)
                status = "ok" if response.status_code == 200 else str(response.status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            done = time.monotonic() - started
            results.append((arrival.t, status, done, done - sent))

        tasks = []
        for index, arrival in enumerate(trace.arrivals):
            delay = arrival.t - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(index, arrival)))
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


def _ingress_lines(app: str) -> list[tuple[float, dict[str, str]]]:
    """Each answered request of `app` as its ingress logged it (the `image_request` line):
    the line's wall-clock time and its fields."""
    import ray

    # Ray keeps Serve's replica logs in the session directory (no public API names it).
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    lines = []
    for path in logs.glob(f"replica_{app}_ImageIngress_*.log"):
        for line in path.read_text().splitlines():
            if " image_request " not in line:
                continue
            stamp = datetime.strptime(" ".join(line.split()[1:3]), "%Y-%m-%d %H:%M:%S,%f")
            pairs = line.split(" image_request ", 1)[1].split()
            fields = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
            if fields.get("outcome") == "ok":
                lines.append((stamp.timestamp(), fields))
    return lines


def _logged_call(fields: dict[str, str]) -> LoggedCall:
    """A logged request's call: its size, steps and images, the seconds it was queued on
    the replica, and the call's seconds (prompt encoding, denoising and decoding)."""
    call_s = sum(float(fields[name]) for name in ("text_encode_s", "denoise_s", "decode_s"))
    return LoggedCall(
        fields["size"],
        int(fields["steps"]),
        int(fields["batch_images"]),
        float(fields["queue_s"]),
        round(call_s, 5),
    )


def server_timings(app: str, started: float) -> list[list[Any]]:
    """Each request of `app` as its ingress logged it: seconds from `started` (wall clock;
    the probe's are before 0), then its `LoggedCall`'s fields, its request id and the
    ingress's own seconds on it (`total_s`: from its arrival there to its answer). The
    replica's own view, which the client's latencies cannot give: how fast the calls ran
    during the trace, against its probe's, and where each request's time went
    (`breakdown.py`)."""
    lines = _ingress_lines(app)
    return sorted(
        [
            round(stamp - started, 3),
            *_logged_call(fields),
            fields.get("request_id", ""),
            float(fields.get("total_s", "nan")),
        ]
        for stamp, fields in lines
    )


def logged_calls(app: str, ids: list[str], wait_s: float = 10.0) -> dict[str, LoggedCall]:
    """The ingress's timings of the requests of `app` sent with these `x-request-id`s, once
    all are in its log (the replica writes each line as its request ends; up to `wait_s`)."""
    wanted, deadline = set(ids), time.monotonic() + wait_s
    while True:
        found = {
            fields["request_id"]: _logged_call(fields)
            for _, fields in _ingress_lines(app)
            if fields.get("request_id") in wanted
        }
        if len(found) == len(wanted) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


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
    from deployments.config.model_config import generator_deployment_name
    from deployments.generator.deployment import ImageGenerator
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


def _run_case(
    case: Case,
    app: str,
    port: int,
    repeat: int,
    service: ServiceModel,
    throttled: bool,
    stretch: float,
    lone: float,
) -> RealRun:
    """One replay of `case` on a fresh application named `app`, after the speed probe on
    its replica (at the calibration's `lone` call speed, `probe.probe_rate`): at the pace
    its probe's lone call sets (`experiment.pace_for`), its times `stretch`ed; the
    application deleted after. A probe during which a replica started (the probe's own load
    scaled the application up) timed calls beside a starting replica, up to x1.6 slower than
    alone, and set the trace's pace by them: it is made again once the application is back
    at `min_replicas`, up to `PROBE_TRIES` times (the discarded factors are recorded)."""
    from ray import serve

    from deployments.config.model_config import generator_deployment_name
    from serve_app import build_app

    serve.run(build_app(app_args(case.settings)), name=app, route_prefix=f"/{app}")
    url = f"http://127.0.0.1:{port}/{app}/v1/images/generations"
    if not throttled:  # a frozen group's tasks count in the load average: it never falls
        wait_for_quiet()
    poller = ReplicaPoller(app, generator_deployment_name("tiny-sd3"))
    poller.start(time.monotonic())
    while not poller.samples:  # Serve's status answers before the probe starts
        time.sleep(0.1)
    at_min = (case.settings.min_replicas, 0)

    def settle() -> float:
        """Wait for the application to be at `min_replicas`, none starting (should the
        probe have scaled it up, for Serve to scale it back down); the seconds it took."""
        settling, settle_by = time.monotonic(), time.monotonic() + SETTLE_MAX_S
        while poller.samples[-1][1:] != at_min:
            if time.monotonic() > settle_by:
                raise RuntimeError(f"{app} did not come back to its min_replicas")
            time.sleep(0.5)
        return round(time.monotonic() - settling, 1)

    discarded: list[float] = []
    for _ in range(PROBE_TRIES):
        settle()
        before = len(poller.samples)
        # A third of one replica's time: no scale-up, unless the machine is slower still.
        speed = probe(url, service, [SMALL, LARGE], lambda ids: logged_calls(app, ids), lone)
        if all(sample[1:] == at_min for sample in poller.samples[before:]):
            break
        discarded.append(speed["factor"])
    speed["discarded"] = discarded
    time.sleep(case.settings.look_back_period_s)  # the probe's load forgotten
    load_before = os.getloadavg()[0]
    # The simulation starts from `min_replicas`, none starting.
    speed["settled_s"] = settle()
    pace = pace_for(service, speed["factor"])
    case = case.at(pace, stretch)
    # The state before the trace holds from its start.
    poller.started, wall_started = time.monotonic(), time.time()
    poller.samples = [(0.0, *poller.samples[-1][1:])]
    print(
        f"[capacity] {case.name}, run {repeat + 1}: {len(case.trace.arrivals)} requests "
        f"in {case.trace.duration_s:g} s (pace x{pace}; load average {load_before:.2f}, "
        f"probe x{speed['factor']} (discarded {discarded}), "
        f"+{speed['overhead_s']} s, settled after {speed['settled_s']} s)",
        flush=True,
    )
    requests = asyncio.run(replay(url, case.trace))
    poller.stop()
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    timeline = [s for s in poller.samples if s[0] <= case.trace.duration_s]
    serve.delete(app)
    starts = poller.start_times()
    server = server_timings(app, wall_started)
    return RealRun(
        case.name, sorted(requests), timeline, starts, load, repeat, speed, server, pace, stretch
    )


def run_cluster(
    selected: list[Case], service: ServiceModel, repeats: int, throttle: Throttle
) -> tuple[list[RealRun], dict[str, Any]]:
    """The calibration, then every case `repeats` times on one two-node cluster, the cases
    interleaved (a drift of the machine's speed reaches all of them alike), each run at its
    probe's pace and all stretched by the calibration's replica start
    (`experiment.stretch_for`); the runs and it.
    The cluster's processes run in `throttle`'s group (at its speed); this one, the clients',
    outside it."""
    # Ray starts its workers at niceness 15, below the load's client and everything else on
    # the machine; at 0 they compete as equals (bench/harness/serve_run.py's SAME_PRIORITY).
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray's own spelling)
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from tests.harness import free_port

    with throttle.inside():  # Ray's processes, and the workers they start, stay in it
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 2, "resources": {"head": 1}, "include_dashboard": False},
        )
        cluster.add_node(num_cpus=2, resources={"generator": SETTINGS.max_replicas})
    ray.init(address=cluster.address, log_to_driver=False)
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    runs: list[RealRun] = []
    try:
        load = os.getloadavg()[0]
        calibration = calibrate_on(port, service)
        calibration["load_average"] = (round(load, 2), round(os.getloadavg()[0], 2))
        print(f"[capacity] calibrated: {calibration['contention'].slowdowns}", flush=True)
        contention = calibration["contention"]
        stretch = stretch_for(statistics.median(contention.notes["starter_start_s"]))
        lone = contention.slowdowns[(1, 0)]
        calibration["stretch"] = stretch
        for repeat in range(repeats):
            for index, case in enumerate(selected):
                app = f"capacity-{index}-{repeat}"
                throttled = throttle.speed < 1.0
                run = _run_case(case, app, port, repeat, service, throttled, stretch, lone)
                runs.append(run)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return runs, calibration
