"""The speed probe before each validation trace, on the replica the trace is about to start
on: open-loop requests (each at its time, whatever the answers, as a trace sends them), each
with an `x-request-id` of its own, their calls timed by the ingress's log. It gives the run
its lone call's factor (the calibration's factors are scaled to it, `Contention.at_speed`)
and its request overhead; nothing in it comes from the traces.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import httpx

from bench.capacity.service import ServiceModel

PROBE_S = 20.0
# The share of the replica's time the probe's calls take, standalone: arrivals land during
# calls, and the replica stays far below the autoscaler's target. A fixed rate would not: 1.2
# requests/s, a third busy in the machine's fast minutes, runs it half busy in a slow one,
# and Serve then scales the application up before its trace begins.
PROBE_BUSY = 1 / 3
PROBE_SEED = 7
PROBE_WARM_CALLS = 2


class LoggedCall(NamedTuple):
    """A request as the ingress logged it: its call's size, steps and images (its batch's),
    the seconds it was queued on the replica and the call's seconds."""

    size: str
    steps: int
    batch_images: int
    queue_s: float
    call_s: float


def probe_rate(service: ServiceModel, kinds, lone: float = 1.0) -> float:
    """Requests a second that keep a replica `PROBE_BUSY` busy with `kinds` in turn, at the
    speed `measure` found the engine at just before times `lone`, the calibration's lone
    call on the cluster: at `measure`'s speed alone, the half-speed probes of 2026-12-08 ran
    the replica half busy and more on a cluster x1.3 slower, and two of four scaled their
    application up, a replica starting beside the calls they timed."""
    mean_s = statistics.fmean(service.call_s(k.size, k.steps, k.images) for k in kinds)
    return PROBE_BUSY / (mean_s * lone)


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
    lone: float = 1.0,
) -> dict[str, Any]:
    """The machine's speed just before a trace, on the replica it is about to start on, as
    the trace's calls run: with requests arriving open-loop during them (`_open_loop`, at
    `probe_rate`, `lone` the calibration's lone call), their calls timed by the ingress
    (`logged`: the requests' `LoggedCall`s by id).

    - the factor: the calls' logged seconds over their standalone ones (the first
      `PROBE_WARM_CALLS` left out, warm-up), which the simulation gives a lone call;
    - the request overhead: the mean of each request's latency less the seconds it was
      queued on the replica and its call's, what the simulation adds to every request.

    Why before every trace: this machine's speed drifts by a third and more between minutes
    (the engine measured alone on an idle machine, three times: 0.124 s, 0.216 s and 0.138 s
    for one 64x64 x 20 call), so a factor measured minutes before a trace does not hold for
    it. Why open-loop: a closed-loop client's next request only comes once the call is
    done, and the traces' calls ran 5% to 29% slower than closed-loop probes' (the ingress's
    logs), where the simulation had 0% to 13%. Why from the ingress's timings: a request's
    latency holds, beyond its call, the proxy's and the ingress's work, which grows when
    others arrive during it (about 0.03 to 0.04 s, where the closed-loop calibration fitted
    0.01 to 0.02 s); fitted to latencies as one factor on the call, it makes every simulated
    call 5% to 14% too slow (such factors over the calls' logged ones)."""
    rate = probe_rate(service, kinds, lone)
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
        "overheads": [round(max(0.0, seconds), 4) for seconds in extra],
        "calls": len(timed),
        "rate": round(rate, 3),
    }
