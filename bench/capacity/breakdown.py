"""Where each request's time went, on the cluster and in its simulation, part by part: the
evidence for what the simulation's tail misses (the latency's p95 alone cannot say which
part ran long).

On the cluster, each trace request carries its own `x-request-id` (`cluster.replay`), and
the ingress logs its seconds for it (`total_s`), the replica's queue and the call's
(`cluster.server_timings`); the client has its latency. So:
- `outside`: latency less the ingress's seconds: the proxy, HTTP, the client;
- `ingress`: the ingress's seconds less the replica's queue and call: the ingress's own work
  and the wait at the handle for a replica with room (the simulation's router);
- `queue`: on the replica, waiting for a worker or a batch;
- `call`: the pipeline call.
The simulation's requests have the same parts: the request overhead, the wait
at the handle, the replica's queue and the call.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.capacity.figures import percentile
from bench.capacity.service import ServiceModel
from bench.capacity.simulation import SimResult

PARTS = ("outside", "ingress", "queue", "call")


def trace_request_id(index: int) -> str:
    """The `x-request-id` of a trace's `index`-th arrival (its place in its run's requests)."""
    return f"trace-{index}"


def _quantiles(parts: dict[str, list[float]]) -> dict[str, Any]:
    return {
        name: {
            "p50_s": round(percentile(values, 50), 3) if values else None,
            "p95_s": round(percentile(values, 95), 3) if values else None,
        }
        for name, values in parts.items()
    }


def real_parts(requests: list[Any], server: list[list[Any]]) -> dict[str, Any] | None:
    """The parts' p50 and p95 over a real run's answered requests (`requests` in arrival
    order, as `RealRun` keeps them; `server` as `cluster.server_timings` gives it); None for
    a run whose log lines carry no request ids (made before they did)."""
    by_id = {row[6]: row for row in server if len(row) > 7 and row[0] >= 0}
    parts: dict[str, list[float]] = {name: [] for name in PARTS}
    for index, (_, status, _, latency) in enumerate(requests):
        row = by_id.get(trace_request_id(index))
        if status != "ok" or row is None or latency is None:
            continue
        queue_s, call_s, total_s = row[4], row[5], row[7]
        parts["outside"].append(latency - total_s)
        parts["ingress"].append(total_s - queue_s - call_s)
        parts["queue"].append(queue_s)
        parts["call"].append(call_s)
    return _quantiles(parts) if parts["call"] else None


def sim_parts(sim: SimResult) -> dict[str, Any]:
    """The same parts of a simulated run."""
    parts: dict[str, list[float]] = {name: [] for name in PARTS}
    for record in sim.requests:
        if record.status != "ok" or record.routed is None or record.call_began is None:
            continue
        assert record.done is not None
        parts["outside"].append(record.overhead_s)
        parts["ingress"].append(record.routed - record.arrival.t)
        parts["queue"].append(record.call_began - record.routed)
        parts["call"].append(record.done - record.overhead_s - record.call_began)
    return _quantiles(parts)


def breakdown_table(data: dict[str, Any]) -> str | None:
    """Each run's parts, real against simulated (None if no run has them)."""
    lines = [
        "| trace | run | part | p50 real | p50 sim | p95 real | p95 sim |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["cases"]:
        for number, run in enumerate(row["real_runs"], start=1):
            parts = run.get("parts")
            if not parts or parts.get("real") is None:
                continue
            real, sim = parts["real"], parts["sim"]
            for name in PARTS:
                lines.append(
                    f"| {row['case']} | {number} | {name} | {real[name]['p50_s']} | "
                    f"{sim[name]['p50_s']} | {real[name]['p95_s']} | {sim[name]['p95_s']} |"
                )
    return "\n".join(lines) if len(lines) > 2 else None


def overlap_effect(server: list[list[Any]], service: ServiceModel) -> dict[str, Any] | None:
    """How much slower a trace's calls ran beside another call than alone, from the
    ingress's log (each call from its line's time less its seconds to that time, a batch's
    jobs once): the median of their seconds over the standalone ones, for calls that
    overlapped another for under a tenth of their time ("alone") and for over half
    ("beside"), and beside over alone, to hold against the calibrated "2 calls" over
    "1 call" the simulation runs with."""
    calls: dict[tuple[str, int, float], list[tuple[float, float, float]]] = {}
    for row in server:
        if row[0] < 0:
            continue
        end, size, steps, images, _, call_s = row[:6]
        # A batch's jobs log the same call seconds within moments of each other: once.
        same = calls.setdefault((size, images, call_s), [])
        if not any(abs(end - other_end) < 0.5 for _, other_end, _ in same):
            same.append((end - call_s, end, call_s / service.call_s(size, steps, images)))
    intervals = [call for same in calls.values() for call in same]
    alone, beside = [], []
    for start, end, ratio in intervals:
        shared = sum(
            max(0.0, min(end, other_end) - max(start, other_start))
            for other_start, other_end, _ in intervals
            if (other_start, other_end) != (start, end)
        ) / max(end - start, 1e-9)
        if shared < 0.1:
            alone.append(ratio)
        elif shared > 0.5:
            beside.append(ratio)
    if len(alone) < 5 or len(beside) < 5:
        return None
    low, high = statistics.median(alone), statistics.median(beside)
    return {
        "alone": round(low, 3),
        "beside": round(high, 3),
        "ratio": round(high / low, 3),
        "calls": [len(alone), len(beside)],
    }


def overlap_table(data: dict[str, Any]) -> str | None:
    """Each run's `overlap_effect` beside the calibration's "2 calls" over "1 call" and its
    probe's lone-call factor (None if no run has one)."""
    slowdowns = {(r["calls"], r["starting"]): r["factor"] for r in data["contention"]["slowdowns"]}
    calibrated = slowdowns.get((2, 0), 1.0) / slowdowns.get((1, 0), 1.0)
    lines = [
        "| trace | run | probe: lone call | trace: alone | trace: beside another | beside / alone "
        "| calibrated 2 calls / 1 call |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["cases"]:
        for number, run in enumerate(row["real_runs"], start=1):
            effect = run.get("overlap")
            if not effect:
                continue
            lines.append(
                f"| {row['case']} | {number} | {run['probe'].get('factor', '-')} | "
                f"{effect['alone']} | {effect['beside']} | {effect['ratio']} | "
                f"{calibrated:.3f} |"
            )
    return "\n".join(lines) if len(lines) > 2 else None
