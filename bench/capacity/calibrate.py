"""Service times on the cluster itself, before the validation's traces: how much slower a
call runs there than `measure` found it alone, by what shares the machine's two cores.

Closed-loop clients, each sending one request at a time and alternating the small and the
large kind, at the real stack (proxy, ingress, generator replicas on the "GPU" node):
- "1 call": one client, a second replica up and idle: the request overhead (the intercept)
  and the slowdown of a lone call (the slope), from latency = overhead + factor x the
  standalone call seconds, fitted over the two kinds;
- "2 calls": two clients, one on each of two applications' replica: two calls at once;
- "1 call, 1 starting": one client while a replica of a third, generator-only application
  loads its model and warms up on the same node (only the requests sent and answered within
  its STARTING window count), twice;
- "saturated" and "backlog": one replica kept busy by 4 clients (its `max_ongoing_requests`)
  and by 4 + `BACKLOG` (that many waiting at the handle), each sending 4-image requests
  that fill a call alone (no batching to account for): the factor is the seconds between
  answers over the calls' standalone seconds, and their ratio the backlog's own effect.
- "warm-up": a fresh one-replica application deployed while the first application's client
  runs on; one client alternating three kinds (small, large, the filling 4-image one) on it
  from the moment it runs ("at once"), and again on another fresh one left idle
  `IDLE_S` first ("idle", as the traces' first replica is): each call's factor (latency
  less the overhead over the standalone seconds) by its place among the replica's calls,
  over the factor of its calls from `STEADY_FROM` on, in blocks of calls 1, 2, 3-4, 5-8,
  9-16, 17-24.
- "probe", before each trace: the lone call's factor and the request overhead for
  `PROBE_S` on the trace's own first replica, its requests sent open-loop as a trace sends
  them and their calls timed by the ingress; the calibration's factors are scaled to its
  factor for that trace (`probe`).
The factors are `Contention` (bench/capacity/contention.py) for the simulation; nothing in
them comes from the traces. It exists for this stand-in only: GPU replicas share no device.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import httpx

from bench.capacity.contention import Contention
from bench.capacity.service import ServiceModel

PHASE_S = 12.0
STARTS = 2
BACKLOG = 8
WARM_S = 30.0
IDLE_S = 5.0
STEADY_FROM = 24
PROBE_S = 20.0
# The share of the replica's time the probe's calls take, standalone: arrivals land during
# calls, and the replica stays far below the autoscaler's target. A fixed rate did not: 1.2
# requests/s, a third busy in the machine's fast minutes, ran it half busy in a slow one
# (run 15), and Serve scaled the application up before its trace began.
PROBE_BUSY = 1 / 3
PROBE_SEED = 7
PROBE_WARM_CALLS = 2
WARM_BLOCKS = ((0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 24))
# (phase, kind name, sent s, latency s, standalone call s)
Sample = tuple[str, str, float, float, float]


def _client(url: str, kinds, service: ServiceModel, phase: list[str], stop, out: list) -> None:
    """One request at a time; a sample for each sent and answered within one phase, or
    (`phase[1]`, the saturated phases) for each answered within it."""
    by_done = len(phase) > 1
    with httpx.Client(timeout=60) as client:
        index = 0
        while not stop.is_set():
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
    samples += _saturated(urls[0], service, filling, 4 + BACKLOG, "backlog")
    first = threading.Thread(
        target=_client, args=(urls[0], kinds, service, phase, stop_first, samples)
    )
    first.start()
    phase[0] = "1 call"
    time.sleep(PHASE_S)
    phase[0] = ""
    second = threading.Thread(
        target=_client, args=(urls[1], kinds[::-1], service, phase, stop_second, samples)
    )
    second.start()
    time.sleep(1.0)
    phase[0] = "2 calls"
    time.sleep(PHASE_S)
    phase[0] = ""
    stop_second.set()
    second.join()
    return {"samples": samples, "stop": stop_first, "thread": first, "phase": phase}


def _warm_run(fresh, name: str, idle_s: float, service: ServiceModel, kinds) -> list[Sample]:
    """Deploy `fresh` ((a one-replica application, its URL for a name)) as `name`, wait
    `idle_s`, then one client on it for `WARM_S`: every answered request, in order (its
    replica's calls, in order)."""
    from ray import serve

    app, url_for = fresh
    serve.run(app, name=name, route_prefix=f"/{name}")
    time.sleep(idle_s)
    samples: list[Sample] = []
    phase, stop = [name], threading.Event()
    url = url_for(name)
    thread = threading.Thread(target=_client, args=(url, kinds, service, phase, stop, samples))
    thread.start()
    time.sleep(WARM_S)
    stop.set()
    thread.join()
    serve.delete(name)
    return samples


def warmup_factors(samples: list[Sample], overhead: float) -> dict[str, Any]:
    """Each block's factor over the steady one (calls from `STEADY_FROM` on), per call."""
    steady = _factor(samples[STEADY_FROM:], overhead)
    blocks = [round(_factor(samples[a:b], overhead) / steady, 3) for a, b in WARM_BLOCKS]
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
    from deployments.model_config import generator_deployment_name

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
    backlog = _throughput_factor([s for s in samples if s[0] == "backlog"])
    notes = {
        "samples": counts,
        "starter_start_s": starts,
        "saturated_factor": round(saturated, 3),
        "backlog_factor": round(backlog, 3),
    }
    warm = {label: warmup_factors(run, overhead) for label, run in warm_runs.items()}
    notes["warmup"] = {
        label: {k: v for k, v in w.items() if k != "per_call"} for label, w in warm.items()
    }
    contention = Contention(
        slowdowns,
        notes,
        (BACKLOG, round(backlog / saturated, 3)),
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


class LoggedCall(NamedTuple):
    """A request as the ingress logged it: its call's size, steps and images (its batch's),
    the seconds it was queued on the replica and the call's seconds."""

    size: str
    steps: int
    batch_images: int
    queue_s: float
    call_s: float


def probe_rate(service: ServiceModel, kinds) -> float:
    """Requests a second that keep a replica `PROBE_BUSY` busy with `kinds` in turn, at the
    speed `measure` found the engine at just before."""
    mean_s = statistics.fmean(service.call_s(k.size, k.steps, k.images) for k in kinds)
    return PROBE_BUSY / mean_s


async def _open_loop(url: str, kinds, rate: float) -> list[tuple[str, float]]:
    """Poisson arrivals at `rate`, `kinds` in turn, for `PROBE_S`, each sent at its
    time whatever the answers (as a trace sends them) with an `x-request-id` of its own;
    each request's id and latency, in the order sent."""
    arrivals = random.Random(PROBE_SEED)
    tag = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=60) as client:

        async def send(index: int, kind) -> tuple[str, float]:
            request_id, sent = f"probe-{tag}-{index}", time.monotonic()
            body = {**kind.body(index), "response_format": "url"}
            headers = {"x-request-id": request_id}
            (await client.post(url, json=body, headers=headers)).raise_for_status()
            return request_id, time.monotonic() - sent

        started, at, sends = time.monotonic(), 0.0, []
        while at < PROBE_S:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            kind = kinds[len(sends) % len(kinds)]
            sends.append(asyncio.ensure_future(send(len(sends), kind)))
            at += arrivals.expovariate(rate)
        return list(await asyncio.gather(*sends))


def probe(
    url: str,
    service: ServiceModel,
    kinds,
    logged: Callable[[list[str]], dict[str, LoggedCall]],
) -> dict[str, Any]:
    """The machine's speed just before a trace, on the replica it is about to start on, as
    the trace's calls run: with requests arriving open-loop during them (`_open_loop`, at
    `probe_rate`), their calls timed by the ingress (`logged`: the requests' `LoggedCall`s
    by id).

    - the factor: the calls' logged seconds over their standalone ones (the first
      `PROBE_WARM_CALLS` left out, warm-up), which the simulation gives a lone call;
    - the request overhead: the mean of each request's latency less the seconds it was
      queued on the replica and its call's, what the simulation adds to every request.

    Why before every trace: this machine's speed drifts by a third and more between minutes
    (the engine measured alone: 0.124 s, 0.216 s and 0.138 s for one 64x64 x 20 call at
    13:01, 14:47 and 15:12), so a factor measured minutes before a trace does not hold for
    it. Why open-loop: a closed-loop client's next request only comes once the call is
    done, and runs 11 and 12's trace calls ran 5% to 29% slower than their closed-loop
    probes (the ingress's logs), where the simulation had 0% to 13%. Why from the ingress's
    timings: a request's latency holds, beyond its call, the proxy's and the ingress's work,
    which grows when others arrive during it (runs 13 and 14: about 0.03 to 0.04 s, where
    the closed-loop calibration fitted 0.01 to 0.02 s); fitted as one factor on the call,
    as runs 13 and 14 did, it made every call of their simulations 5% to 14% too slow (their
    probes' factors over the calls' logged ones)."""
    rate = probe_rate(service, kinds)
    sent = asyncio.run(_open_loop(url, kinds, rate))[PROBE_WARM_CALLS:]
    calls = logged([request_id for request_id, _ in sent])
    timed = [(latency, calls[request_id]) for request_id, latency in sent if request_id in calls]
    if not timed:
        raise RuntimeError("the probe's requests are not in the ingress's log")
    standalone = sum(service.call_s(c.size, c.steps, c.batch_images) for _, c in timed)
    extra = [latency - c.queue_s - c.call_s for latency, c in timed]
    return {
        "factor": round(sum(c.call_s for _, c in timed) / standalone, 3),
        "overhead_s": round(max(0.0, statistics.fmean(extra)), 4),
        "calls": len(timed),
        "rate": round(rate, 3),
    }


def phases(samples: list[Sample]) -> set[str]:
    return {s[0] for s in samples}
