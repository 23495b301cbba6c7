"""How a video model's replicas scale: on the jobs waiting in its queue and those running.

Serve's `AsyncInferenceAutoscalingPolicy` polls the queue's length in the broker, and adds
the HTTP requests the replicas hold; but a task consumer's replicas hold no HTTP request,
and a job a replica has taken is no longer in the queue. On its own, that policy sees no
load once the queue drains while every replica is mid-job, and scales them down under their
jobs (each then handed back and run again from its first step). `VideoQueuePolicy` adds the
jobs the replicas report running (`VideoGenerator.record_autoscaling_stats`) to the queue's
length it polls, and wants `target_ongoing_requests` of them per replica.

The Redis URL may come from an environment variable, read where the policy runs (Serve's
controller): a URL with a password is then in no config Serve shows.
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext

from deployments.config.video_config import redis_url_from

# The key of the dict `VideoGenerator.record_autoscaling_stats` returns.
RUNNING_METRIC = "video_jobs_running"
POLICY_FUNCTION = "deployments.videos.queue_policy:VideoQueuePolicy"


class VideoQueuePolicy:
    """Serve's deployment-level policy for a video model (see the module's docstring)."""

    def __init__(
        self,
        queue_name: str,
        redis_url: str | None = None,
        redis_url_env: str | None = None,
        poll_interval_s: float = 2.0,
    ) -> None:
        # Imported here: its broker client needs tornado, which only the controller loads.
        from ray.serve.async_inference_autoscaling_policy import (
            AsyncInferenceAutoscalingPolicy,
        )

        self._queue = AsyncInferenceAutoscalingPolicy(
            broker_url=redis_url_from(redis_url, redis_url_env),
            queue_name=queue_name,
            poll_interval_s=poll_interval_s,
        )

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        _, state = self._queue(ctx)  # polls the queue's length now and then
        waiting = float(state.get("queue_length") or 0)
        running = running_jobs(ctx)
        state = {"queue_length": waiting, "running_jobs": running}
        jobs = waiting + running + (ctx.total_num_requests or 0.0)
        if ctx.current_num_replicas == 0:
            return (1.0 if jobs > 0 else 0.0), state
        return jobs / ctx.config.get_target_ongoing_requests(), state


def running_jobs(ctx: AutoscalingContext) -> float:
    """The jobs the running replicas report running."""
    reported = (ctx.aggregated_metrics or {}).get(RUNNING_METRIC) or {}
    running = set(ctx.running_replicas)
    return float(sum(value for replica, value in reported.items() if replica in running))
