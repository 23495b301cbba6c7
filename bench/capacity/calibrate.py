"""Service times on the cluster itself, before the validation's traces: how much slower a
call runs there than `measure` found it alone, by what shares the machine's two cores.

Closed-loop clients, each sending one request at a time and alternating the small and the
large kind, at the real stack (proxy, ingress, generator replicas on the "GPU" node):
- "1 call": one client, a second replica up and idle: the request overhead (the intercept)
  and the slowdown of a lone call (the slope), from latency = overhead + factor x the
  standalone call seconds, fitted over the two kinds;
- "2 calls": two clients, one on each of two applications' replica: two calls at once,
  in turns with "1 call" (`TURNS`), so that a drift of the machine reaches both alike;
- "1 call, 1 starting": one client while a replica of a third, generator-only application
  loads its model and warms up on the same node (only the requests sent and answered within
  its STARTING window count), twice;
- "saturated" and "backlog N": one replica kept busy by 4 clients (its
  `max_ongoing_requests`) and by 4 + N for each N of `BACKLOGS` (that many waiting at the
  handle), each sending 4-image requests that fill a call alone (no batching to account
  for): the factor is the seconds between answers over the calls' standalone seconds, and
  each backlog's over the saturated one its own effect. At two backlogs, because a trace's
  bursts hold far more waiting than one point says: the calls of a full-speed run that
  overlapped no other ran x1.1 to x1.4 their standalone seconds with 0 to 2 requests in the
  system and x1.5 to x2.2 with 5 to 40 (a few calls each, three validations of
  2026-12-07), where the one backlog measured (8 waiting) said x1.05 to x1.27 and nothing
  beyond.
- "warm-up": a fresh one-replica application deployed while the first application's client
  runs on; one client alternating three kinds (small, large, the filling 4-image one) on it
  from the moment it runs ("at once"), and again on another fresh one left idle
  `IDLE_S` first ("idle", as the traces' first replica is): each call's factor (latency
  less the overhead over the standalone seconds) by its place among the replica's calls,
  over the factor of its calls from `STEADY_FROM` on, in blocks of calls 1, 2, 3-4, 5-8,
  9-16, 17-24, none below 1 (a replica's first calls faster than its later ones are the
  machine's drift between them, not the replica: one calibration measured x0.58).
Before each trace, `bench/capacity/probe.py` measures the lone call's factor again (and the
request overhead), and the calibration's factors are scaled to it for that trace.
The factors are `Contention` (bench/capacity/contention.py) for the simulation; nothing in
them comes from the traces. It exists for this stand-in only: GPU replicas share no device.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import httpx

from bench.capacity.contention import Contention
from bench.capacity.service import ServiceModel

PHASE_S = 15.0
TURNS = 3  # "1 call" and "2 calls" each in this many turns of PHASE_S / TURNS
STARTS = 2
BACKLOGS = (8, 24)  # requests waiting at the handle in the backlog phases
# A warm-up run lasts until its replica has answered `WARM_CALLS` calls (the blocks and the
# steady ones after them), `WARM_MAX_S` at most: 30 s fixed were 24 calls at full speed and
# too few at half.
WARM_CALLS = 32
WARM_MAX_S = 120.0
IDLE_S = 5.0
STEADY_FROM = 24
WARM_BLOCKS = ((0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 24))
# (phase, kind name, sent s, latency s, standalone call s)
Sample = tuple[str, str, float, float, float]


def _client(
    url: str,
    kinds,
    service: ServiceModel,
    phase: list[str],
    stop,
    out: list,
    gate: threading.Event | None = None,
    idle: threading.Event | None = None,
) -> None:
    """One request at a time; a sample for each sent and answered within one phase, or
    (`phase[1]`, the saturated phases) for each answered within it. With a `gate`, it sends
    only while the gate is open, and sets `idle` while it waits there."""
    by_done = len(phase) > 1
    with httpx.Client(timeout=60) as client:
        index = 0
        while not stop.is_set():
            if gate is not None and idle is not None and not gate.is_set():
                idle.set()
                gate.wait(0.1)
                continue
            if idle is not None:
                idle.clear()
            kind = kinds[index % len(kinds)]
            body = {**kind.body(index), "response_format": "url"}
            label, sent = phase[0], time.monotonic()
            client.post(url, json=body).raise_for_status()
            latency = time.monotonic() - sent
            if by_done:
                label = phase[0]
            if label and phase[0] == label:  # the whole request within one phase
                call_s = service.call_s(kind.size, kind.steps, kind.images)
                out.append((label, kind.name, sent, latency, call_s))
            index += 1


def _fit(samples: list[Sample]) -> tuple[float, float]:
    """Least squares of latency = overhead + factor x call seconds."""
    xs, ys = [s[4] for s in samples], [s[3] for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope /= sum((x - mx) ** 2 for x in xs)
    return max(0.0, my - slope * mx), slope


def _factor(samples: list[Sample], overhead: float) -> float:
    return sum(s[3] - overhead for s in samples) / sum(s[4] for s in samples)


def _throughput_factor(samples: list[Sample]) -> float:
    """A saturated replica's seconds between its first and last answer over the standalone
    seconds of the calls answered in between."""
    done = sorted((s[2] + s[3], s[4]) for s in samples)
    return (done[-1][0] - done[0][0]) / sum(call_s for _, call_s in done[1:])


def _saturated(url: str, service: ServiceModel, kind, clients: int, label: str) -> list:
    samples: list[Sample] = []
    phase, stop = ["", "by done"], threading.Event()
    threads = [
        threading.Thread(target=_client, args=(url, [kind], service, phase, stop, samples))
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    time.sleep(3.0)  # every client's first request answered, the queue in place
    phase[0] = label
    time.sleep(PHASE_S)
    phase[0] = ""
    stop.set()
    for thread in threads:
        thread.join()
    return samples


def _starting(app: str, deployment: str) -> int | None:
    from ray import serve

    try:
        states = serve.status().applications[app].deployments[deployment].replica_states
    except KeyError:
        return None
    return states.get("STARTING", 0) if not states.get("RUNNING", 0) else -1


def _start_one(starter, app: str, deployment: str, phase: list[str]) -> float:
    """Deploy the generator-only `starter` in a thread and label the client's requests
    while its replica is STARTING; the seconds it was."""
    from ray import serve

    options = {"name": app, "route_prefix": None}
    thread = threading.Thread(target=serve.run, args=(starter,), kwargs=options)
    thread.start()
    began, deadline = None, time.monotonic() + 180
    while time.monotonic() < deadline:
        state = _starting(app, deployment)
        if state and state > 0 and began is None:
            began, phase[0] = time.monotonic(), "1 call, 1 starting"
        if state == -1:
            break
        time.sleep(0.1)
    phase[0] = ""
    thread.join()
    serve.delete(app)
    return round(time.monotonic() - (began or time.monotonic()), 2)


def calibrate(
    urls: tuple[str, str], service: ServiceModel, starter, kinds, filling
) -> dict[str, Any]:
    """The phases above on two running applications (`urls`, one replica each) and the
    generator-only `starter` application, `filling` the kind that fills a call; the
    overhead, the contention and the samples."""
    phase, stop_first, stop_second = [""], threading.Event(), threading.Event()
    for url in urls:  # warm both replicas and connections
        with httpx.Client(timeout=60) as client:
            for kind in [*kinds, filling]:
                client.post(url, json={**kind.body(0), "response_format": "url"})
    samples = _saturated(urls[0], service, filling, 4, "saturated")
    for waiting in BACKLOGS:
        samples += _saturated(urls[0], service, filling, 4 + waiting, f"backlog {waiting}")
    first = threading.Thread(
        target=_client, args=(urls[0], kinds, service, phase, stop_first, samples)
    )
    first.start()
    # "1 call" and "2 calls" in turns: the machine's speed drifts by a tenth and more
    # between two 12 s phases, which landed in their ratio (x1.02 to x1.20 between
    # calibrations) when one phase ran after the other.
    gate, idle = threading.Event(), threading.Event()
    second = threading.Thread(
        target=_client,
        args=(urls[1], kinds[::-1], service, phase, stop_second, samples, gate, idle),
    )
    second.start()
    for _ in range(TURNS):
        idle.wait()  # the second client's last request answered: one call at a time
        phase[0] = "1 call"
        time.sleep(PHASE_S / TURNS)
        phase[0] = ""
        gate.set()
        time.sleep(0.5)  # its first request on the way
        phase[0] = "2 calls"
        time.sleep(PHASE_S / TURNS)
        phase[0] = ""
        gate.clear()
    stop_second.set()
    second.join()
    return {"samples": samples, "stop": stop_first, "thread": first, "phase": phase}


def _warm_run(fresh, name: str, idle_s: float, service: ServiceModel, kinds) -> list[Sample]:
    """Deploy `fresh` ((a one-replica application, its URL for a name)) as `name`, wait
    `idle_s`, then one client on it until `WARM_CALLS` are answered (`WARM_MAX_S` at
    most): every answered request, in order (its replica's calls, in order)."""
    from ray import serve

    app, url_for = fresh
    serve.run(app, name=name, route_prefix=f"/{name}")
    time.sleep(idle_s)
    samples: list[Sample] = []
    phase, stop = [name], threading.Event()
    url = url_for(name)
    thread = threading.Thread(target=_client, args=(url, kinds, service, phase, stop, samples))
    thread.start()
    deadline = time.monotonic() + WARM_MAX_S
    while len(samples) < WARM_CALLS and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    thread.join()
    serve.delete(name)
    return samples


def warmup_factors(samples: list[Sample], overhead: float) -> dict[str, Any]:
    """Each block's factor over the steady one (calls from `STEADY_FROM` on), per call."""
    # Fewer calls than the blocks (a replica slower than `WARM_MAX_S` allows): the later
    # half counts as steady, and a block with no call as no slower.
    steady = _factor(samples[STEADY_FROM:] or samples[len(samples) // 2 :], overhead)
    blocks = [
        round(max(1.0, _factor(samples[a:b], overhead) / steady), 3) if samples[a:b] else 1.0
        for a, b in WARM_BLOCKS
    ]
    per_call = [f for (a, b), f in zip(WARM_BLOCKS, blocks, strict=True) for _ in range(b - a)]
    return {
        "steady": round(steady, 3),
        "blocks": blocks,
        "calls": len(samples),
        "per_call": per_call,
    }


def finish(
    started: dict[str, Any], starter, starter_app: str, fresh=None, service=None, kinds=()
) -> dict[str, Any]:
    """The starting phases (the second application deleted by now), the warm-up ones (with
    `fresh`), then the factors."""
    from deployments.config.model_config import generator_deployment_name

    deployment = generator_deployment_name("tiny-sd3")
    phase = started["phase"]
    starts = [_start_one(starter, starter_app, deployment, phase) for _ in range(STARTS)]
    warm_runs = {}
    if fresh is not None:
        for label, idle_s in (("at once", 0.0), ("idle", IDLE_S)):
            name = "calibrate-warm" + ("-idle" if idle_s else "")
            warm_runs[label] = _warm_run(fresh, name, idle_s, service, kinds)
    started["stop"].set()
    started["thread"].join()
    samples: list[Sample] = started["samples"]
    alone = [s for s in samples if s[0] == "1 call"]
    overhead, lone = _fit(alone)
    slowdowns = {(1, 0): round(lone, 3)}
    for label, key in (("2 calls", (2, 0)), ("1 call, 1 starting", (1, 1))):
        chosen = [s for s in samples if s[0] == label]
        if chosen:
            slowdowns[key] = round(_factor(chosen, overhead), 3)
    counts = {label: sum(1 for s in samples if s[0] == label) for label in sorted(phases(samples))}
    saturated = _throughput_factor([s for s in samples if s[0] == "saturated"])
    backlogs = {
        waiting: _throughput_factor([s for s in samples if s[0] == f"backlog {waiting}"])
        for waiting in BACKLOGS
    }
    notes = {
        "samples": counts,
        "starter_start_s": starts,
        "saturated_factor": round(saturated, 3),
        "backlog_factors": {str(waiting): round(f, 3) for waiting, f in backlogs.items()},
    }
    warm = {label: warmup_factors(run, overhead) for label, run in warm_runs.items()}
    notes["warmup"] = {
        label: {k: v for k, v in w.items() if k != "per_call"} for label, w in warm.items()
    }
    contention = Contention(
        slowdowns,
        notes,
        # None faster than the saturated replica: waiting requests add work, never take it.
        tuple((waiting, round(max(1.0, f / saturated), 3)) for waiting, f in backlogs.items()),
        tuple(warm["at once"]["per_call"]) if warm else (),
        tuple(warm["idle"]["per_call"]) if warm else (),
    )
    rounded = [[round(v, 4) if isinstance(v, float) else v for v in s] for s in samples]
    return {
        "request_overhead_s": round(overhead, 4),
        "contention": contention,
        "samples": rounded,
        "warmup_samples": {
            label: [[round(v, 4) if isinstance(v, float) else v for v in s] for s in run]
            for label, run in warm_runs.items()
        },
    }


def phases(samples: list[Sample]) -> set[str]:
    return {s[0] for s in samples}
