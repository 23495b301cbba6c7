"""`VideoGenerator`: a video model's replicas, each a consumer of the model's job queue.

Unlike the image generators, nothing calls this deployment through a handle: it is a Ray
Serve task consumer (`ray.serve.task_consumer`), and Serve starts a Celery worker in each
replica that takes the model's jobs from Redis, `jobs_per_replica` at a time (the replica's
`max_ongoing_requests`). `video_deployment` applies the consumer decorator at build time,
since the queue is named by the config. Each delivery runs in one of the worker's threads,
on the replica's one pipeline (`VideoModel` gives each call its own scheduler and generator).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from typing import Any

import redis
from ray import serve
from ray.serve.task_consumer import task_consumer, task_handler

from deployments.config.app_config import StorageConfig
from deployments.config.video_config import (
    VIDEO_TASK,
    VideoConfig,
    VideoModelConfig,
    video_deployment_name,
)
from deployments.metrics import VideoMetrics
from deployments.storage import open_store
from deployments.video.job_runner import RunSettings, VideoJobRunner
from deployments.video.video_model import VideoModel
from deployments.videos.queue_policy import RUNNING_METRIC
from deployments.videos.video_jobs import VideoJobStore
from deployments.videos.video_queue import task_processor_config
from deployments.videos.webhook_delivery import DeliveryAttempt, WebhookEndpoint, WebhookSender

logger = logging.getLogger("ray.serve")
# The longest a stopping replica waits for its runs to reach their next step and hand their
# jobs back (a step of a large model on a busy GPU may take tens of seconds).
STOP_WAIT_S = 600.0


class VideoGenerator:
    def __init__(
        self,
        model: VideoModelConfig,
        videos: VideoConfig,
        storage: StorageConfig,
        redis_url: str,
    ) -> None:
        self._model_id = model.id
        self._queue = videos.queue_name(model.id)
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._metrics = VideoMetrics(model.id)
        self._jobs = VideoJobStore.connect(redis_url, videos.key_prefix, videos.lease_s)
        self._files = open_store(storage)
        self._webhooks = _webhook_sender(videos, self._metrics)
        video_model = VideoModel.load(
            model.source, device=model.device, dtype=model.dtype, max_frames=model.max_frames
        )
        # What the ingress checks requests against at once (before, the job would fail).
        self._jobs.publish_limits(model.id, asdict(video_model.limits))
        self._runner = VideoJobRunner(
            video_model,
            self._jobs,
            self._files,
            RunSettings(max_attempts=videos.max_attempts, retention_s=storage.ttl_s),
            webhooks=self._webhooks,
            metrics=self._metrics,
            queue_length=self._queue_length,
        )
        logger.info("video model %s ready on queue %s", model.id, self._queue)

    @task_handler(name=VIDEO_TASK)
    def generate_video(self, video_id: str) -> str:
        return self._runner.run(video_id)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The jobs this replica runs, which the queue policy adds to the queue's length
        (`deployments/videos/queue_policy.py`)."""
        return {RUNNING_METRIC: float(self._runner.running)}

    def stop_runs(self) -> None:
        self._runner.stop()

    def check_health(self) -> None:
        # A replica that cannot reach the jobs' Redis takes no job: Serve restarts it.
        self._jobs.ping()

    def _queue_length(self) -> int:
        try:
            return int(self._redis.llen(self._queue))
        except redis.RedisError:
            return 0

    def __del__(self) -> None:
        if getattr(self, "_webhooks", None) is not None:
            self._webhooks.close()
        self._jobs.close()


def _webhook_sender(videos: VideoConfig, metrics: VideoMetrics) -> WebhookSender | None:
    if not videos.webhooks:
        return None
    endpoints = []
    for endpoint in videos.webhooks:
        secret = os.environ.get(endpoint.secret_env, "")
        if not secret:
            raise ValueError(f"videos.webhooks: ${endpoint.secret_env} is not set")
        endpoints.append(WebhookEndpoint(url=endpoint.url, secret=secret))

    def record(attempt: DeliveryAttempt) -> None:
        metrics.webhook_attempt(_outcome(attempt))

    return WebhookSender(endpoints, max_attempts=videos.webhook_max_attempts, on_attempt=record)


def _outcome(attempt: DeliveryAttempt) -> str:
    if attempt.delivered:
        return "delivered"
    if attempt.dropped:
        return "dropped"
    return "failed" if attempt.final else "retrying"


def video_deployment(
    model: VideoModelConfig,
    videos: VideoConfig,
    redis_url: str,
    overrides: dict[str, Any] | None = None,
) -> serve.Deployment:
    """The model's deployment: `VideoGenerator` consuming the model's own queue."""
    consumer = task_consumer(
        task_processor_config=task_processor_config(videos, model.id, redis_url)
    )(VideoGenerator)

    class StoppingConsumer(consumer):
        """Serve's consumer tells Celery's worker to stop and waits 10 s for the jobs it
        runs, then the replica is killed under them: first, each run stops at its next step
        and hands its job back to the queue, so another replica takes it at once."""

        def __del__(self) -> None:
            if getattr(self, "_runner", None) is not None:
                self.stop_runs()
                # A step may outlast the 10 s Serve's consumer gives Celery's worker; Serve
                # kills the replica at its `graceful_shutdown_timeout_s` in any case.
                deadline = time.monotonic() + STOP_WAIT_S
                while self._runner.running and time.monotonic() < deadline:
                    time.sleep(0.1)
            super().__del__()

    StoppingConsumer.__name__ = StoppingConsumer.__qualname__ = VideoGenerator.__name__
    return serve.deployment(StoppingConsumer).options(
        name=video_deployment_name(model.id),
        **videos.deployment_options(model, overrides),
    )
