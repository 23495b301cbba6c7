"""Arrival traces: when requests come and what each asks for, seeded so that the simulation
and the real cluster see the very same requests.

Arrivals are a Poisson process whose rate may change over time (steady, a ramp, a burst),
drawn by thinning (Lewis and Shedler): candidates at the peak rate, each kept with
probability rate(t) / peak.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from deployments.autoscaling_policy import job_work


@dataclass(frozen=True)
class RequestKind:
    """One kind of request: its size, steps and images."""

    name: str
    width: int
    height: int
    steps: int
    images: int = 1

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def work(self) -> int:
        """Steps x pixels, as the replicas report it to the cost-aware policy."""
        return job_work(self.width, self.height, self.images, self.steps, None)

    def body(self, seed: int) -> dict:
        return {
            "prompt": "a lighthouse on a cliff at dusk",
            "size": self.size,
            "num_inference_steps": self.steps,
            "n": self.images,
            "seed": seed,
            "response_format": "b64_json",
        }


@dataclass(frozen=True)
class Arrival:
    t: float  # seconds from the trace's start
    kind: RequestKind
    seed: int


@dataclass(frozen=True)
class Trace:
    name: str
    duration_s: float
    arrivals: tuple[Arrival, ...]
    description: str

    @property
    def rate(self) -> float:
        return len(self.arrivals) / self.duration_s


Mix = Sequence[tuple[RequestKind, float]]  # kinds and their weights


def _draw(
    rate: Callable[[float], float],
    peak: float,
    duration_s: float,
    mix: Callable[[float], Mix],
    seed: int,
) -> tuple[Arrival, ...]:
    rng = random.Random(seed)
    arrivals = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return tuple(arrivals)
        keep = rng.random() < rate(t) / peak
        kinds, weights = zip(*mix(t), strict=True)
        kind = rng.choices(kinds, weights)[0]
        request_seed = rng.randrange(2**31)
        if keep:
            arrivals.append(Arrival(t=round(t, 4), kind=kind, seed=request_seed))


def steady(rate: float, duration_s: float, mix: Mix, seed: int = 0) -> Trace:
    arrivals = _draw(lambda _: rate, rate, duration_s, lambda _: mix, seed)
    return Trace("steady", duration_s, arrivals, f"Poisson, {rate:g} requests/s")


def ramp(start: float, end: float, duration_s: float, mix: Mix, seed: int = 0) -> Trace:
    def rate(t: float) -> float:
        return start + (end - start) * t / duration_s

    arrivals = _draw(rate, max(start, end), duration_s, lambda _: mix, seed)
    return Trace("ramp", duration_s, arrivals, f"Poisson, {start:g} -> {end:g} requests/s")


def burst(
    base: float,
    peak: float,
    start_s: float,
    length_s: float,
    duration_s: float,
    mix: Mix,
    burst_mix: Mix | None = None,
    seed: int = 0,
    name: str = "burst",
) -> Trace:
    """`base` requests/s, `peak` from `start_s` for `length_s` (of `burst_mix` if given)."""

    def in_burst(t: float) -> bool:
        return start_s <= t < start_s + length_s

    arrivals = _draw(
        lambda t: peak if in_burst(t) else base,
        max(base, peak),
        duration_s,
        lambda t: burst_mix if burst_mix is not None and in_burst(t) else mix,
        seed,
    )
    what = f"Poisson, {base:g} requests/s, {peak:g} for {length_s:g} s from {start_s:g} s"
    if burst_mix is not None:
        what += " (the burst of another mix)"
    return Trace(name, duration_s, arrivals, what)
