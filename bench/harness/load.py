"""The benchmarks' one load driver: closed-loop load over HTTP, `concurrency` clients, each
sending its next request as soon as the last one is answered, with a fixed, seeded request mix.

And its open-loop sibling (`open_loop`): requests sent at Poisson arrival times, whatever the
answers, for latency at a given rate.

Two modes of the closed loop: for a fixed duration (`duration_s`: the CPU benchmarks, whose
requests take milliseconds), or a fixed count (`rounds` requests per client: the GPU
benchmark, where a large image takes seconds and a fixed count keeps each point's cost
predictable), optionally bounded by `timeout_s` in all.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

GENERATIONS = "/v1/images/generations"
PROMPTS = [
    "a lighthouse on a cliff at dusk",
    "a bowl of ramen, studio photo",
    "an astronaut riding a horse",
    "a watercolor of a fox in snow",
    "a city street after rain, neon",
    "a cabin in a pine forest",
    "a macro photo of a dragonfly",
    "a still life with lemons",
]


@dataclass(frozen=True)
class Workload:
    name: str
    size: str
    steps: int
    images_per_request: int = 1
    model: str | None = None  # the server's default model when None

    def request(self, rng: random.Random) -> dict:
        body = {
            "prompt": rng.choice(PROMPTS),
            "size": self.size,
            "num_inference_steps": self.steps,
            "n": self.images_per_request,
            "seed": rng.randrange(2**32),
            "response_format": "b64_json",
        }
        if self.model is not None:
            body["model"] = self.model
        return body

    @property
    def pixels(self) -> int:
        width, height = (int(side) for side in self.size.split("x"))
        return width * height

    @staticmethod
    def work(body: dict) -> float:
        """A request's denoising steps x pixels (the throughput unit of mixed workloads)."""
        width, height = (int(side) for side in body["size"].split("x"))
        return width * height * body["num_inference_steps"] * body.get("n", 1)


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    images: int
    latencies_s: list[float] = field(repr=False)
    statuses: dict[str, int]
    work: float = 0.0  # steps x pixels of the answered requests
    # Each answered request's steps x pixels, in the order of `latencies_s`.
    works: list[float] = field(default_factory=list, repr=False)

    @property
    def images_per_s(self) -> float:
        return self.images / self.duration_s

    @property
    def errors(self) -> int:
        """Answers other than 200, and requests that got none."""
        return sum(count for status, count in self.statuses.items() if status != "200")

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def summary(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "images_per_s": round(self.images_per_s, 3),
            "requests": len(self.latencies_s),
            "p50_s": round(self.percentile(50), 4),
            "p95_s": round(self.percentile(95), 4),
            "p99_s": round(self.percentile(99), 4),
            "mean_s": round(statistics.fmean(self.latencies_s), 4) if self.latencies_s else None,
            "statuses": self.statuses,
        }


@dataclass
class _Tally:
    """What one load's requests got back: both loops send through `post`."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    images: int = 0
    work: float = 0.0
    works: list[float] = field(default_factory=list)

    async def post(self, client: httpx.AsyncClient, workload: Workload, body: dict) -> None:
        """Send one request and count its answer (its latency and work only if 200)."""
        sent = time.perf_counter()
        try:
            response = await client.post(GENERATIONS, json=body)
        except httpx.HTTPError as error:
            self.statuses[type(error).__name__] += 1
            return
        self.statuses[str(response.status_code)] += 1
        if response.status_code == 200:
            self.latencies.append(time.perf_counter() - sent)
            self.images += len(response.json()["data"])
            self.works.append(workload.work(body))
            self.work += self.works[-1]

    def result(self, concurrency: int, elapsed: float) -> LoadResult:
        return LoadResult(
            concurrency,
            elapsed,
            self.images,
            self.latencies,
            dict(self.statuses),
            self.work,
            self.works,
        )


def closed_loop(
    base_url: str,
    workload: Workload,
    concurrency: int,
    duration_s: float | None = None,
    seed: int = 0,
    warmup_requests: int | None = None,
    rounds: int | None = None,
    request_timeout_s: float = 600,
    timeout_s: float | None = None,
) -> LoadResult:
    """Run the load for `duration_s`, or until each client has sent `rounds` requests; first
    `warmup_requests` at once (default: one per client), not counted. Raises TimeoutError if
    the whole runs past `timeout_s`."""
    load = _closed_loop(
        base_url,
        workload,
        concurrency,
        duration_s,
        seed,
        warmup_requests,
        rounds,
        request_timeout_s,
    )
    bound = max(1.0, timeout_s) if timeout_s is not None else None
    return asyncio.run(asyncio.wait_for(load, timeout=bound))


async def _closed_loop(
    base_url: str,
    workload: Workload,
    concurrency: int,
    duration_s: float | None,
    seed: int,
    warmup_requests: int | None,
    rounds: int | None,
    request_timeout_s: float,
) -> LoadResult:
    tally = _Tally()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=request_timeout_s, limits=limits
    ) as client:
        warmup = random.Random(seed - 1)
        await asyncio.gather(
            *(
                client.post(GENERATIONS, json=workload.request(warmup))
                for _ in range(warmup_requests if warmup_requests is not None else concurrency)
            )
        )
        started = time.perf_counter()
        deadline = started + duration_s if duration_s is not None else float("inf")

        async def client_loop(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            sent_requests = 0
            while time.perf_counter() < deadline and sent_requests != rounds:
                sent_requests += 1
                await tally.post(client, workload, workload.request(rng))

        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return tally.result(concurrency, elapsed)


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


def open_loop(
    base_url: str,
    workload: Workload,
    rate_per_s: float,
    duration_s: float,
    seed: int = 0,
    request_timeout_s: float = 600,
) -> LoadResult:
    """Requests at Poisson arrivals of `rate_per_s` for `duration_s` (seeded), each sent
    when its time comes whether or not earlier ones were answered; waits for every answer.
    `concurrency` in the result is the number of requests sent."""
    return asyncio.run(
        _open_loop(base_url, workload, rate_per_s, duration_s, seed, request_timeout_s)
    )


async def _open_loop(
    base_url: str,
    workload: Workload,
    rate_per_s: float,
    duration_s: float,
    seed: int,
    request_timeout_s: float,
) -> LoadResult:
    rng = random.Random(seed)
    arrivals, at = [], rng.expovariate(rate_per_s)
    while at < duration_s:
        arrivals.append(at)
        at += rng.expovariate(rate_per_s)
    bodies = [workload.request(rng) for _ in arrivals]
    tally = _Tally()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=request_timeout_s, limits=limits
    ) as client:
        started = time.perf_counter()

        async def send(arrival: float, body: dict) -> None:
            await asyncio.sleep(max(0.0, started + arrival - time.perf_counter()))
            await tally.post(client, workload, body)

        await asyncio.gather(*(send(a, b) for a, b in zip(arrivals, bodies, strict=True)))
        elapsed = time.perf_counter() - started
    return tally.result(len(arrivals), elapsed)
