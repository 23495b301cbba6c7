"""What the validation runs, on the real cluster and in the simulation alike: two request
kinds, four seeded traces of 75 s, Serve's autoscaling settings (short delays, so that a
trace sees the autoscaler act) and the generator's application args.

`bench/capacity/cluster.py` replays these on a real local cluster, `validate.py` compares.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    name: str
    trace: Trace
    settings: AutoscalingSettings


# A request of MIX's standalone seconds on the engine the traces' rates were chosen for
# (`measure`: 0.115 s for SMALL, 0.45 s for LARGE).
REFERENCE_REQUEST_S = 0.2


def pace_for(service: ServiceModel) -> float:
    """How many times the traces' rates a validation sends: the reference request's seconds
    over MIX's now, so that the replicas carry the same load in any minute of the machine.
    At fixed rates a slow minute (the engine 70% slower than in a fast one) puts the ramp's
    first seconds at the autoscaler's threshold, where one replica more or less is a coin
    flip of the run."""
    weights = sum(weight for _, weight in MIX)
    mean_s = sum(weight * service.call_s(k.size, k.steps, k.images) for k, weight in MIX)
    return round(REFERENCE_REQUEST_S / (mean_s / weights), 3)


def cases(pace: float = 1.0) -> list[Case]:
    """The four traces, every rate times `pace` (`pace_for`)."""
    return [
        Case("steady", steady(4.0 * pace, DURATION_S, MIX, seed=1), SETTINGS),
        Case("ramp", ramp(1.0 * pace, 5.0 * pace, DURATION_S, MIX, seed=2), SETTINGS),
        Case(
            "burst",
            burst(2.0 * pace, 5.5 * pace, 20.0, 15.0, DURATION_S, MIX, seed=3),
            SETTINGS,
        ),
        Case(
            "burst-large (cost-aware)",
            # Large requests at 5 x pace a second: at 2.5 (and 3.5) the burst scaled out at some
            # speeds of the engine and not at others (a trace at the policy's threshold;
            # tests/unit/test_capacity_validation.py simulates it at x1, x0.7 and x0.5).
            burst(
                2.0 * pace,
                5.0 * pace,
                20.0,
                15.0,
                DURATION_S,
                [(SMALL, 1.0)],
                [(LARGE, 1.0)],
                seed=4,
                name="burst-large",
            ),
            COST_AWARE,
        ),
    ]


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
