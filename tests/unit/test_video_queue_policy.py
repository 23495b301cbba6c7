"""The video models' autoscaling policy: the jobs waiting in the queue (polled from a real
Redis, as Serve's `AsyncInferenceAutoscalingPolicy` polls it) plus the jobs the replicas
report running, at `target_ongoing_requests` per replica. Without the running jobs, a
drained queue would scale replicas down under their jobs."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.config.video_config import VideoConfig
from deployments.videos.queue_policy import RUNNING_METRIC, VideoQueuePolicy

DEPLOYMENT = DeploymentID(name="VideoGenerator:tiny-wan", app_name="images")
QUEUE = "image-service:video:queue:tiny-wan"


def context(running: dict[str, float], target: float = 1.0) -> AutoscalingContext:
    replicas = {name: ReplicaID(unique_id=name, deployment_id=DEPLOYMENT) for name in running}
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name=DEPLOYMENT.name,
        app_name=DEPLOYMENT.app_name,
        current_num_replicas=len(replicas),
        target_num_replicas=len(replicas),
        running_replicas=list(replicas.values()),
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics={
            RUNNING_METRIC: {replicas[name]: jobs for name, jobs in running.items()}
        },
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=time.time(),
        config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=target),
    )


@pytest.fixture
def loop():
    """One event loop for every call, as the controller's."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def decide(loop, policy: VideoQueuePolicy, ctx: AutoscalingContext) -> tuple[float, dict]:
    """Calls a poll interval apart, as the controller's: a call starts a poll of the
    queue's length once the interval has passed, and a later call sees what it read."""

    async def calls() -> tuple[float, dict]:
        for _ in range(3):
            policy(ctx)
            await asyncio.sleep(0.3)
        return policy(ctx)

    return loop.run_until_complete(calls())


def test_waiting_and_running_jobs_both_want_replicas(redis_server, monkeypatch, loop):
    monkeypatch.setenv("VIDEO_REDIS", redis_server.url)
    with redis_server.client() as plain:
        plain.delete(QUEUE)
        plain.rpush(QUEUE, "a", "b", "c")
    policy = VideoQueuePolicy(QUEUE, redis_url_env="VIDEO_REDIS", poll_interval_s=0.1)
    desired, state = decide(loop, policy, context({"r1": 1.0, "r2": 1.0}))
    assert state == {"queue_length": 3.0, "running_jobs": 2.0}
    assert desired == 5.0
    # The queue drained, both replicas still mid-job: both stay.
    with redis_server.client() as plain:
        plain.delete(QUEUE)
    desired, _ = decide(loop, policy, context({"r1": 1.0, "r2": 1.0}))
    assert desired == 2.0
    desired, _ = decide(loop, policy, context({"r1": 0.0, "r2": 0.0}))
    assert desired == 0.0


def test_the_config_names_the_policy_without_the_url_in_it():
    videos = VideoConfig.model_validate(
        {
            "redis_url_env": "VIDEO_REDIS",
            "models": [{"deployment": {"autoscaling_config": {"max_replicas": 3}}}],
        }
    )
    policy = videos.deployment_options(videos.models[0])["autoscaling_config"]["policy"]
    assert policy["policy_function"] == "deployments.videos.queue_policy:VideoQueuePolicy"
    assert policy["policy_kwargs"] == {
        "queue_name": QUEUE,
        "redis_url": None,
        "redis_url_env": "VIDEO_REDIS",
    }
