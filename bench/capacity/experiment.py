"""What the validation runs, on the real cluster and in the simulation alike: two request
kinds, four seeded traces of 75 s, Serve's autoscaling settings (short delays, so that a
trace sees the autoscaler act) and the generator's application args.

`bench/capacity/cluster.py` replays these on a real local cluster, `validate.py` compares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from bench.capacity.autoscaler import AutoscalingSettings
from bench.capacity.service import ServiceModel
from bench.capacity.simulation import ReplicaSettings
from bench.capacity.traces import RequestKind, Trace, burst, ramp, steady

SMALL = RequestKind("small", 64, 64, 20)
LARGE = RequestKind("large", 256, 256, 40)
MIX = [(SMALL, 3.0), (LARGE, 1.0)]
DURATION_S = 75.0
SIZES = [SMALL.size, LARGE.size]
BATCHES = [1, 2, 4]

# Short delays so that a 75 s trace sees the autoscaler act; the same fields as production.
# The downscale delay is 30 s, not 10: at 10 the steady and ramp traces hold the ongoing
# requests near the one-replica threshold, and whether a 10 s lull scales the second replica
# down is a coin flip of the run (the ramp scaled down in one real run of three and in every
# simulation), which no model can be within 20% of.
SETTINGS = AutoscalingSettings(
    min_replicas=1,
    max_replicas=2,
    target_ongoing_requests=2,
    upscale_delay_s=3,
    downscale_delay_s=30,
    look_back_period_s=3,
    metrics_interval_s=0.5,
)
COST_AWARE = AutoscalingSettings(
    **{**SETTINGS.__dict__, "cost_target_step_pixels": 2.0 * LARGE.work}
)
REPLICA = ReplicaSettings(
    max_ongoing_requests=4,
    max_queued_requests=100,
    worker_threads=1,
    max_batch_images=4,
    max_batch_pixels=4 * 256 * 256,
)
REQUEST_TIMEOUT_S = 100.0
# Each case runs this many times on the cluster (interleaved) and in the simulation (one
# seed each). One run of each, by default: every run is judged against its own simulation,
# and the four cases fit the validation in 15 minutes (`--repeats` for more; the figures
# of several are their medians).
REPEATS = 1


@dataclass(frozen=True)
class Case:
    """A trace and the settings it runs under. `build`, where given, draws the trace again
    at a pace and a stretch (`at`); `trace` is it at pace 1, unstretched."""

    name: str
    trace: Trace
    settings: AutoscalingSettings
    build: Callable[[float, float], Trace] | None = None

    def at(self, pace: float, stretch: float = 1.0) -> Case:
        """The case with every rate times `pace` and every time (the trace's length, its
        ramp, its burst's start and length) times `stretch`."""
        if self.build is None:
            return self
        return replace(self, trace=self.build(pace, stretch))


# A request of MIX on the cluster when the rates were chosen: 0.2 s standalone (`measure`:
# 0.115 s for SMALL, 0.45 s for LARGE) times the lone call's factor the full-speed probes
# measured then (x1.15 to x1.20).
REFERENCE_REQUEST_S = 0.235
# A replica's start on the cluster when the traces' times were chosen (the calibration's
# starter: 16.7 to 18.8 s at full speed): no stretch at full speed.
REFERENCE_START_S = 20.0


def pace_for(service: ServiceModel, lone_factor: float = 1.0) -> float:
    """How many times the traces' rates a run sends: the reference request's seconds over
    MIX's on the cluster now (`service`, `measure`'s engine alone, times the lone call's
    factor the run's probe measured on the cluster), so that the replicas carry the same
    load in any minute of the machine. At fixed rates a slow minute (the engine 70% slower
    than in a fast one) puts the ramp's first seconds at the autoscaler's threshold, where
    one replica more or less is a coin flip of the run; paced by the engine alone, the
    half-speed runs of 2026-12-07 ran 1.2 to 1.7 times past the load the traces meant (the
    cluster slower than the engine alone, more so when throttled), p50s of 7 to 12 s."""
    weights = sum(weight for _, weight in MIX)
    mean_s = sum(weight * service.call_s(k.size, k.steps, k.images) for k, weight in MIX)
    return round(REFERENCE_REQUEST_S / (lone_factor * mean_s / weights), 3)


def stretch_for(start_s: float) -> float:
    """How many times the traces' times a run takes: a replica start of `start_s` (the
    calibration's) over the reference one, never below 1. A 75 s trace cannot show a
    scale-out whose replica takes 50 s to start (half speed, 2026-12-07: the ramp and the
    cost-aware burst ended before their second replica ran, for real and in simulation)."""
    return round(max(1.0, start_s / REFERENCE_START_S), 2)


def cases(pace: float = 1.0, stretch: float = 1.0) -> list[Case]:
    """The four traces, every rate times `pace` (`pace_for`), every time times `stretch`
    (`stretch_for`)."""
    built = [
        ("steady", _steady, SETTINGS),
        ("ramp", _ramp, SETTINGS),
        ("burst", _burst, SETTINGS),
        ("burst-large (cost-aware)", _burst_large, COST_AWARE),
    ]
    return [Case(name, build(pace, stretch), settings, build) for name, build, settings in built]


def _steady(pace: float, stretch: float) -> Trace:
    return steady(4.0 * pace, DURATION_S * stretch, MIX, seed=1)


def _ramp(pace: float, stretch: float) -> Trace:
    return ramp(1.0 * pace, 5.0 * pace, DURATION_S * stretch, MIX, seed=2)


def _burst(pace: float, stretch: float) -> Trace:
    return burst(
        2.0 * pace, 5.5 * pace, 20.0 * stretch, 15.0 * stretch, DURATION_S * stretch, MIX, seed=3
    )


def _burst_large(pace: float, stretch: float) -> Trace:
    # Large requests at 5 x pace a second: at 2.5 (and 3.5) the burst scaled out at some
    # speeds of the engine and not at others (a trace at the policy's threshold;
    # tests/unit/test_capacity_validation.py simulates it at x1, x0.7 and x0.5).
    return burst(
        2.0 * pace,
        5.0 * pace,
        20.0 * stretch,
        15.0 * stretch,
        DURATION_S * stretch,
        [(SMALL, 1.0)],
        [(LARGE, 1.0)],
        seed=4,
        name="burst-large",
    )


def app_args(settings: AutoscalingSettings | None) -> dict[str, Any]:
    """The application's args: the embedded model on the CPU, its replicas on the node with
    the `generator` resource, one pipeline call at a time each (a GPU replica's shape); with
    no `settings`, one replica and no autoscaling (the calibration's)."""
    scaling = {"num_replicas": 1} if settings is None else {}
    if settings is not None:
        scaling = {"autoscaling_config": settings.serve_config()}
    model: dict[str, Any] = {
        "id": "tiny-sd3",
        "device": "cpu",
        "default_size": SMALL.size,
        "deployment": {
            "max_ongoing_requests": REPLICA.max_ongoing_requests,
            "max_queued_requests": REPLICA.max_queued_requests,
            "graceful_shutdown_timeout_s": 30,
            "graceful_shutdown_wait_loop_s": 0.5,
            **scaling,
            # Half a CPU: one torch thread (`cpu_threads_per_call`); two fit the node.
            "ray_actor_options": {"num_cpus": 0.5, "resources": {"generator": 1}},
        },
    }
    if settings is not None and settings.cost_target_step_pixels is not None:
        model["autoscaling_policy"] = {
            "kind": "cost_aware",
            "target_step_pixels_per_replica": settings.cost_target_step_pixels,
        }
    return {
        "models": [model],
        "batching": {
            "max_batch_images": REPLICA.max_batch_images,
            "max_batch_pixels": REPLICA.max_batch_pixels,
        },
        "worker_threads": REPLICA.worker_threads,
        "request_timeout_s": REQUEST_TIMEOUT_S,
    }
