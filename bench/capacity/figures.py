"""The figures compared between the simulation and the real cluster, from a run's requests
and its running replicas over time: the same arithmetic for both."""

from __future__ import annotations

from typing import Any

from bench.capacity.autoscaler import replica_seconds

COMPARED = ("mean_replicas", "throughput_rps", "p50_s", "p95_s")
# What a validation judges each run on (throughput is reported, not judged: an open-loop
# trace that refuses nothing answers its arrival rate whatever the model).
JUDGED = ("mean_replicas", "p50_s", "p95_s", "first_scale_up_s")


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
