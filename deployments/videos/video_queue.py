"""The video models' queues: Ray Serve's task consumer on Celery, over the jobs' Redis.

Serve ships two adapters for `@task_consumer`: Celery's and TaskIQ's. In Ray 2.60 every
method of the TaskIQ adapter but `initialize` raises `NotImplementedError` (it waits for "a
follow-up PR"), so the queues use Celery's. Its settings here are what durability needs:
- late acknowledgement and requeue on a lost worker (Serve's adapter sets both): a job
  whose replica dies is not acknowledged, and Redis hands it out again after
  `videos.redelivery_s` (Celery's visibility timeout);
- a prefetch multiplier of one: a replica reserves one job per consumer thread
  (`jobs_per_replica`), so an idle replica is not left waiting while another holds a backlog;
- retries of `DeliverLater` only (a delivery that must wait), never of a run's own failure:
  that is the job's, written to its record;
- one queue per model, so only that model's replicas take its jobs.
The message carries the job's id and nothing else: the record in Redis is the job.
"""

from __future__ import annotations

from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
from ray.serve.task_consumer import instantiate_adapter_from_config

from deployments.config.video_config import VIDEO_TASK, VideoConfig


class DeliverLater(RuntimeError):
    """A delivery that cannot run its job now: the job is held by another live run, its
    record cannot be reached, or the replica is stopping. Celery delivers it again later
    (backing off up to `lease_s`, without limit: the job ends by its record, which a run
    finishes or which expires), so that a job is never dropped while it is unfinished."""


def task_processor_config(
    videos: VideoConfig, model_id: str, redis_url: str
) -> TaskProcessorConfig:
    """The `@task_consumer` config of `model_id`'s queue."""
    return TaskProcessorConfig(
        queue_name=videos.queue_name(model_id),
        adapter_config=CeleryAdapterConfig(
            broker_url=redis_url,
            backend_url=redis_url,
            broker_transport_options={"visibility_timeout": videos.redelivery_s},
            app_custom_config={
                "worker_prefetch_multiplier": 1,
                "broker_connection_retry_on_startup": True,
                # The record holds a job's outcome; Celery's own results only need to
                # outlive the message.
                "result_expires": 3600,
                # Serve's replica logs are the logs: Celery keeps its hands off the root
                # logger and prints no banner of its own on each replica.
                "worker_hijack_root_logger": False,
                "worker_redirect_stdouts": False,
            },
            # A run's failures are the job's (the worker records them): Celery retries only
            # `DeliverLater`, never an error Serve's adapter would otherwise retry blindly.
            # `max_retries` both as the task's own (Celery falls back to it, 3 by default,
            # when a retry names None) and in the retry's arguments (Serve's adapter puts
            # its own there).
            task_custom_config={
                "autoretry_for": (DeliverLater,),
                "max_retries": None,
                "retry_kwargs": {"max_retries": None},
                "retry_backoff_max": max(1, int(videos.lease_s)),
            },
        ),
    )


class VideoQueues:
    """The ingress's side of the queues: puts a job's id on its model's queue."""

    def __init__(self, videos: VideoConfig, redis_url: str) -> None:
        self._adapters = {
            model.id: instantiate_adapter_from_config(
                task_processor_config(videos, model.id, redis_url)
            )
            for model in videos.models
        }

    def enqueue(self, model_id: str, video_id: str) -> None:
        """Blocking (a Redis write): call it from a thread. No result is kept: the record
        is the job's outcome."""
        self._adapters[model_id].enqueue_task_sync(VIDEO_TASK, args=[video_id], ignore_result=True)
