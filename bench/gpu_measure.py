"""Closed-loop load with a fixed number of requests: `concurrency` clients each send `rounds`
requests, the next as soon as the last is answered. At 28 steps a large image takes seconds,
so a fixed count (rather than a fixed duration) keeps each point's cost predictable.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx

from bench.load import LoadResult, Workload, closed_loop

GENERATIONS = "/v1/images/generations"


def run_rounds(
    base_url: str,
    workload: Workload,
    concurrency: int,
    rounds: int,
    timeout_s: float,
    seed: int = 0,
) -> LoadResult:
    """The load's result; raises TimeoutError if it runs past `timeout_s`."""

    async def bounded() -> LoadResult:
        return await asyncio.wait_for(
            # No warm-up requests here: the benchmark warms each lever up itself.
            closed_loop(
                base_url,
                workload,
                concurrency,
                seed=seed,
                warmup_requests=0,
                rounds=rounds,
                request_timeout_s=900,
            ),
            timeout=max(1.0, timeout_s),
        )

    return asyncio.run(bounded())


def warm_up(base_url: str, workload: Workload, timeout_s: float) -> float:
    """One request at the workload's size (first-use costs: kernels picked, caches filled);
    the seconds it took. Raises if it fails."""
    started = time.perf_counter()
    response = httpx.post(
        base_url + GENERATIONS,
        json=workload.request(random.Random(-1)),
        timeout=max(1.0, timeout_s),
    )
    if response.status_code != 200:
        raise RuntimeError(f"warm-up at {workload.size}: {response.status_code} {response.text}")
    return time.perf_counter() - started
