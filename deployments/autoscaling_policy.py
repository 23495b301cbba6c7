"""Cost-aware autoscaling of a generator deployment: replicas from the work its replicas
hold, in denoising steps x pixels, instead of from how many requests they hold.

Serve's default policy counts requests: one 28-step 1024x1024 image and one 4-step 256x256
image weigh the same, though the first costs over a hundred times the second. This policy
counts what a request costs a denoiser: width x height x images x the steps it still has to
run (a transformer's or a UNet's work per step grows with the pixels; the steps multiply it).

    desired replicas = (W + Q x W / J) / target_step_pixels_per_replica

- W: the work the running replicas report (`ImageGenerator.record_autoscaling_stats`,
  `WORK_METRIC`): each held job's remaining steps x width x height x images, waiting or
  running, each replica's figure averaged by Serve over `look_back_period_s`;
- J: the jobs those replicas hold (`JOBS_METRIC`), so W / J is the mean work of a job;
- Q: the requests queued at the handles, not yet on a replica (Serve's
  `total_queued_requests`), counted at that mean.

Until a running replica has reported (the first seconds of a deployment), Serve's default
policy decides. Serve applies the rest itself, as to any deployment-level policy: in Ray 2.60
`DeploymentAutoscalingState.register` wraps the policy with
`ray.serve.autoscaling_policy._apply_autoscaling_config`, which applies `upscaling_factor`
and `downscaling_factor`, `upscale_delay_s`, `downscale_delay_s` and
`downscale_to_zero_delay_s`, and the fast path from zero replicas; `apply_bounds` then clips
to `min_replicas`/`max_replicas`. So this module reimplements none of it
(tests/unit/test_autoscaling_policy.py pins that wrapping).

Serve's controller loads this module (it cloudpickles the class by value, and imports what
it refers to): it imports Ray and `deployments.jobs` (for the edits' one step rule), and no
torch (checked by the tests).
"""

from __future__ import annotations

from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

from deployments.jobs import edit_steps_run

# The keys of the dict `ImageGenerator.record_autoscaling_stats` returns.
WORK_METRIC = "work_step_pixels"
JOBS_METRIC = "work_jobs"

# What `autoscaling_config.policy.policy_function` names; Serve makes one instance per
# deployment with `policy_kwargs` and calls it every control-loop tick.
POLICY_FUNCTION = "deployments.autoscaling_policy:CostAwarePolicy"


def job_work(width: int, height: int, images: int, steps: int, strength: float | None) -> int:
    """Steps x pixels of a whole job. An edit denoises `steps x strength` of its steps,
    counted by the edits' one rule (`jobs.edit_steps_run`), rounded up as SD3 and FLUX do
    (SDXL rounds down: one step less at most)."""
    if strength is not None:
        steps = max(1, edit_steps_run("ceil", steps, strength))
    return width * height * images * steps


class CostAwarePolicy:
    """Serve's deployment-level policy (`policy_function` names this class, `policy_kwargs`
    hold its arguments): the replicas that keep `target_step_pixels_per_replica` of work on
    each."""

    def __init__(self, target_step_pixels_per_replica: float) -> None:
        if not target_step_pixels_per_replica > 0:
            raise ValueError("target_step_pixels_per_replica must be positive")
        self.target_step_pixels_per_replica = float(target_step_pixels_per_replica)

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        return desired_replicas(ctx, self.target_step_pixels_per_replica), {}


def held_work(ctx: AutoscalingContext) -> tuple[float, float] | None:
    """(W, J): the work and jobs the running replicas report, or None if none has yet."""
    metrics = ctx.aggregated_metrics or {}
    running = set(ctx.running_replicas)
    work = {r: v for r, v in (metrics.get(WORK_METRIC) or {}).items() if r in running}
    if not work:
        return None
    jobs = metrics.get(JOBS_METRIC) or {}
    return sum(work.values()), sum(jobs.get(replica, 0.0) for replica in work)


def desired_replicas(ctx: AutoscalingContext, target_step_pixels_per_replica: float) -> float:
    """The formula of the module's docstring, before Serve's factors, delays and bounds."""
    if ctx.current_num_replicas == 0:
        # Nothing reports; Serve's wrapper starts a replica itself once a request waits.
        return float(ctx.target_num_replicas)
    held = held_work(ctx)
    if held is None:
        desired, _ = replica_queue_length_autoscaling_policy(ctx)
        return float(desired)
    work, jobs = held
    queued = ctx.total_queued_requests or 0.0
    mean_job = work / jobs if jobs > 0 else 0.0
    return (work + queued * mean_job) / target_step_pixels_per_replica
