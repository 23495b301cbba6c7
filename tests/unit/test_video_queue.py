"""The video queues' Celery settings, on the task Serve's adapter registers: a delivery that
must wait (`DeliverLater`) is retried past Celery's default three retries (a job held by a
long run would otherwise lose its message after a few seconds), and nothing else is retried.
Eager `apply` runs the task and its retries in this process, with no broker."""

from __future__ import annotations

from ray.serve.task_consumer import instantiate_adapter_from_config

from deployments.config.video_config import VIDEO_TASK, VideoConfig
from deployments.videos.video_queue import DeliverLater, task_processor_config

UNREACHABLE = "redis://127.0.0.1:1/0"  # never connected to: eager runs need no broker


def registered(handler):
    """The task as Serve's adapter registers it, on a Celery app of its own."""
    videos = VideoConfig.model_validate({"redis_url": UNREACHABLE})
    adapter = instantiate_adapter_from_config(
        task_processor_config(videos, "tiny-wan", UNREACHABLE)
    )
    # A name of the test's own: Celery warns of one name for two callables across apps.
    name = f"{VIDEO_TASK}-{handler.__name__}"
    adapter.register_task_handle(handler, name)
    return adapter._app.tasks[name]


def test_a_delivery_that_must_wait_is_retried_past_celerys_default_limit():
    calls = []

    def waits(video_id: str) -> str:
        calls.append(video_id)
        if len(calls) <= 6:  # twice Celery's default of three retries
            raise DeliverLater("held by another run")
        return "completed"

    # Eager retries run at once, each inside the last: every delivery is counted here.
    registered(waits).apply(args=["video_1"])
    assert len(calls) == 7  # six waits, then the run


def test_a_runs_own_failure_is_not_retried():
    calls = []

    def fails(video_id: str) -> str:
        calls.append(video_id)
        raise RuntimeError("a bug")

    result = registered(fails).apply(args=["video_1"])
    assert isinstance(result.result, RuntimeError)
    assert len(calls) == 1
