"""The capacity of the shipped GPU config (config/sd3.5-medium.yaml) at 10, 100 and 1000
requests/s, on paper: the simulation run with GPU service times taken from published
figures instead of measured ones (no GPU was lent to this work), and the autoscaling
settings it recommends.

Assumptions, each a figure a reader can replace:
- Service time of SD3.5 Medium on one H100, bf16, 28 steps with guidance, 1024x1024:
  1.8 s an image. Two derivations agree: Hugging Face measured SD3 Medium at 4.76 s on an
  A100 (https://huggingface.co/blog/sd3), and 4.76 s x 312 / 790 (A100 and H100 dense
  bf16 TFLOP/s) is 1.88 s; the quick 1.4 PFLOP-an-image estimate at 790 TFLOP/s is 1.8 s.
  This project's own count of the transformer's work (`bench/flops.py`: 630 TFLOP, a
  0.80 s floor) puts 1.8 s at 44% of the H100's 790 TFLOP/s.
- Batching: none at 1024x1024 (one image fills the GPU; the config's `max_batch_pixels`
  runs it alone); at 512x512 a call of 4 gives 3x the images/s of a call of 1 (2 images:
  1.8x), the 512x512 image costing 22% of a 1024x1024 one at full use (`bench/flops.py`:
  137 against 630 TFLOP).
- A call's fixed part (prompt encoding and the VAE's decode) is 8% of it.
- One pipeline call at a time on a GPU: the config's second worker thread overlaps a
  call's CPU-side phases with another's denoising, a gain not counted here.
- A replica starts in 130 s (a process, the weights, and the compile lever's warm-up:
  `bench/gpu_plan.py` plans 40 s + 90 s).
- Requests spend 0.05 s outside the replica (proxy, ingress, PNG encoding).
- One GPU costs $2.50 an hour (an assumption: an on-demand H100 price; use your own).
- The objective: p95 latency at most 5 s (about 2.8 x one image's 1.8 s).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from bench.capacity.autoscaler import AutoscalingSettings
from bench.capacity.service import CallCost, ServiceModel
from bench.capacity.simulation import ReplicaSettings, simulate
from bench.capacity.traces import RequestKind, burst

H100_S_PER_1024_IMAGE = 1.8
FIXED_SHARE = 0.08
SMALL_IMAGE_SHARE = 137 / 630  # 512x512 against 1024x1024, at full use
BATCH_GAIN_512 = {1: 1.0, 2: 1.8, 4: 3.0}
START_S = 130.0
REQUEST_OVERHEAD_S = 0.05
DOLLARS_PER_GPU_HOUR = 2.50
P95_OBJECTIVE_S = 5.0
RATES = (10.0, 100.0, 1000.0)

LARGE = RequestKind("1024x1024 x 28", 1024, 1024, 28)


def _cost(seconds: float, steps: int = 28) -> CallCost:
    return CallCost(fixed_s=seconds * FIXED_SHARE, per_step_s=seconds * (1 - FIXED_SHARE) / steps)


def gpu_service() -> ServiceModel:
    """Call costs on one H100 from the figures above."""
    costs = {("1024x1024", n): _cost(n * H100_S_PER_1024_IMAGE) for n in (1, 2, 4)}
    at_full_use = H100_S_PER_1024_IMAGE * SMALL_IMAGE_SHARE  # seconds an image, batched
    alone = at_full_use * BATCH_GAIN_512[4]  # one image alone gets a third of that speed
    for n, gain in BATCH_GAIN_512.items():
        costs[("512x512", n)] = _cost(n * alone / gain)
    return ServiceModel(
        costs=costs,
        source="published figures: SD3.5 Medium, H100, bf16, 28 steps "
        "(bench/capacity/extrapolate.py)",
        request_overhead_s=REQUEST_OVERHEAD_S,
    )


# The shipped GPU config's generator (config/sd3.5-medium.yaml), one call at a time.
SHIPPED = ReplicaSettings(
    max_ongoing_requests=12,
    # 100 at each of the config's two ingress replicas (the model has one handle).
    max_queued_requests=200,
    worker_threads=1,
    max_batch_images=4,
    max_batch_pixels=1024 * 1024,
    start_s=START_S,
    max_wait_ms=20,  # every 1024x1024 batch is full (one image): it never waits
)
SHIPPED_AUTOSCALING = AutoscalingSettings(
    min_replicas=1,
    max_replicas=4,
    target_ongoing_requests=8,
    upscale_delay_s=30,
    downscale_delay_s=600,
)
TARGETS = (1.0, 1.25, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class Plan:
    rate: float
    target_ongoing_requests: float
    min_replicas: int
    max_replicas: int
    summary: dict[str, Any]

    @property
    def dollars_per_hour(self) -> float:
        return self.summary["mean_replicas"] * DOLLARS_PER_GPU_HOUR

    def row(self) -> dict[str, Any]:
        answered = self.summary["throughput_rps"]
        return {
            "rate_rps": self.rate,
            "target_ongoing_requests": self.target_ongoing_requests,
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "mean_replicas": self.summary["mean_replicas"],
            "peak_replicas": self.summary["max_replicas"],
            "dollars_per_hour": round(self.dollars_per_hour, 2),
            "dollars_per_1000_images": round(self.dollars_per_hour / (answered * 3.6), 3)
            if answered
            else None,
            "p50_s": self.summary["p50_s"],
            "p95_s": self.summary["p95_s"],
            "rejected": self.summary["rejected"],
            "requests": self.summary["requests"],
            "meets_objective": self.meets_objective,
        }

    @property
    def meets_objective(self) -> bool:
        p95 = self.summary["p95_s"]
        return p95 is not None and p95 <= P95_OBJECTIVE_S and self.summary["rejected"] == 0


def planning_trace(rate: float, duration_s: float, seed: int = 0):
    """`rate` requests/s of 1024x1024 x 28 steps, and a third more for a quarter of the
    time: how much headroom the settings keep, with replicas that take minutes to start."""
    return burst(
        rate,
        rate * 4 / 3,
        duration_s / 2,
        duration_s / 4,
        duration_s,
        [(LARGE, 1.0)],
        seed=seed,
        name=f"{rate:g} rps",
    )


def plan(rate: float, target: float, service: ServiceModel, duration_s: float) -> Plan:
    """Serve's autoscaler at `target` ongoing requests a replica under `rate`: it starts at
    the replicas that target should settle at, never goes below what the steady rate keeps
    busy (5% spare), nor above a half more than it starts with."""
    seconds = service.call_s(LARGE.size, LARGE.steps, 1)
    # A replica running one call at a time and holding `target` requests on average is
    # busy about target / (target + 1) of the time (roughly an M/D/1 queue at that load).
    settle = rate * seconds * (target + 1) / target
    low = max(1, math.ceil(rate * seconds * 1.05))
    start = max(low, math.ceil(settle))
    high = max(start + 1, math.ceil(start * 1.5))
    settings = AutoscalingSettings(
        min_replicas=low,
        max_replicas=high,
        initial_replicas=start,
        target_ongoing_requests=target,
        upscale_delay_s=30,
        downscale_delay_s=600,
        look_back_period_s=30,
        metrics_interval_s=10,
    )
    trace = planning_trace(rate, duration_s)
    result = simulate(trace, service, settings, SHIPPED, seed=0)
    return Plan(rate, target, low, high, result.summary())


def extrapolate(duration_s: float = 900.0) -> dict[str, Any]:
    service = gpu_service()
    started = time.time()
    plans = []
    for rate in RATES:
        # The largest target that meets the objective is the cheapest.
        candidates = [plan(rate, target, service, duration_s) for target in TARGETS]
        meeting = [p for p in candidates if p.meets_objective]
        best = max(meeting, key=lambda p: p.target_ongoing_requests) if meeting else None
        plans.append(
            {
                "rate_rps": rate,
                "candidates": [p.row() for p in candidates],
                "recommended": best.row() if best else None,
            }
        )
    shipped = simulate(
        planning_trace(RATES[0], duration_s), service, SHIPPED_AUTOSCALING, SHIPPED, seed=0
    )
    return {
        "service": service.to_json(),
        "assumptions": {
            "h100_s_per_1024_image": H100_S_PER_1024_IMAGE,
            "fixed_share": FIXED_SHARE,
            "small_image_share": round(SMALL_IMAGE_SHARE, 4),
            "batch_gain_512": BATCH_GAIN_512,
            "replica_start_s": START_S,
            "request_overhead_s": REQUEST_OVERHEAD_S,
            "dollars_per_gpu_hour": DOLLARS_PER_GPU_HOUR,
            "p95_objective_s": P95_OBJECTIVE_S,
            "trace": "1024x1024 x 28 steps, Poisson at the rate, 4/3 of it for the third "
            f"quarter; {duration_s:g} s",
        },
        "plans": plans,
        "shipped_config_at_10_rps": shipped.summary(),
        "compute_s": round(time.time() - started, 1),
    }
