"""`args.videos`: the video models, and the Redis their jobs live in.

A video takes minutes on a GPU, so `POST /v1/videos` answers at once with a job: the ingress
writes the job's record to Redis and puts its id on the model's queue (Ray Serve's task
consumer, on Celery over the same Redis); a replica of the model's `VideoGenerator`
deployment takes it, writes its progress to the record, and stores the MP4 in
`args.storage`, so any ingress replica answers for any job and none is lost with a pod.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from ray.serve.schema import DeploymentSchema

from deployments.config.base import Strict
from deployments.config.quota_config import check_redis_url

VIDEO_DEPLOYMENT = "VideoGenerator"
SIZE_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"
# The name of the one task every video queue carries.
VIDEO_TASK = "generate_video"


class VideoModelConfig(Strict):
    """A video model: what its replicas load, its requests' defaults, its deployment."""

    id: str = Field(
        default="tiny-wan",
        min_length=1,
        description="The name clients pass as `model` to `POST /v1/videos`.",
    )
    source: str = Field(
        default="embedded:tiny-wan",
        min_length=1,
        description="A hub id (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`), a local `save_pretrained` "
        "directory, or `embedded:tiny-wan` for the built-in tiny Wan.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="Weights' dtype (`bfloat16` on GPUs)."
    )
    device: str = Field(default="cpu", description="`cpu`, `cuda`, `cuda:1`, ...")
    default_size: str = Field(
        default="32x32",
        pattern=SIZE_PATTERN,
        description="`size` when a request gives none (`WIDTHxHEIGHT`).",
    )
    sizes: list[Annotated[str, Field(pattern=SIZE_PATTERN)]] = Field(
        default_factory=list,
        description="The sizes served (`WIDTHxHEIGHT` each); empty: any size that is a "
        "multiple of the model's own and at most `max_pixels`.",
    )
    max_pixels: int = Field(default=1280 * 720, ge=1, description="Largest width x height.")
    seconds: list[int] = Field(
        default_factory=lambda: [1, 2, 4],
        min_length=1,
        description="The clip lengths served, in seconds; the first is the default.",
    )
    fps: int | None = Field(
        default=None, ge=1, le=60, description="Frames per second; unset: the model's own."
    )
    max_frames: int = Field(
        default=81, ge=1, description="Most frames in one clip (Wan 2.1 was trained on 81)."
    )
    default_steps: int = Field(default=4, ge=1, description="Denoising steps when not given.")
    max_steps: int = Field(default=50, ge=1, description="Largest `num_inference_steps`.")
    default_guidance_scale: float | None = Field(
        default=None, ge=0, description="`guidance_scale` when not given; unset: the model's."
    )
    jobs_per_replica: int = Field(
        default=1,
        ge=1,
        description="Jobs one replica runs at once (its queue consumer's threads).",
    )
    deployment: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray Serve options of this model's `VideoGenerator` deployment "
        "(`num_replicas`, `ray_actor_options`, ...). `autoscaling_config` without a `policy` "
        "scales on the model's queue length (Serve's `AsyncInferenceAutoscalingPolicy`).",
    )

    @field_validator("deployment")
    @classmethod
    def _valid_deployment_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - (set(DeploymentSchema.model_fields) - {"name"}))
        if unknown:
            raise ValueError(f"unknown deployment option(s): {', '.join(unknown)}")
        if "max_ongoing_requests" in value:
            raise ValueError("max_ongoing_requests is set by jobs_per_replica")
        DeploymentSchema.model_validate({"name": "video", **value})
        return value

    @model_validator(mode="after")
    def _defaults_fit(self) -> VideoModelConfig:
        if self.default_steps > self.max_steps:
            raise ValueError("default_steps exceeds max_steps")
        if self.sizes and self.default_size not in self.sizes:
            raise ValueError(f"default_size {self.default_size} is not one of sizes")
        width, height = (int(side) for side in self.default_size.split("x"))
        if width * height > self.max_pixels:
            raise ValueError(f"default_size {self.default_size} exceeds max_pixels")
        if any(second < 1 for second in self.seconds):
            raise ValueError("seconds: each must be at least 1")
        return self


class WebhookEndpointConfig(Strict):
    """Where `video.completed` and `video.failed` events are sent, signed."""

    url: str = Field(..., pattern=r"^https?://", description="The receiver's URL.")
    secret_env: str = Field(
        ...,
        min_length=1,
        description="Name of an environment variable holding the signing secret "
        "(`whsec_` and base64, as OpenAI's and Standard Webhooks' secrets).",
    )


class VideoConfig(Strict):
    """Video models and their jobs."""

    models: list[VideoModelConfig] = Field(
        default_factory=lambda: [VideoModelConfig()],
        min_length=1,
        description="The video models served, each on its own deployment and queue.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis of the jobs' records and queues; or give `redis_url_env`. Turn on "
        "its persistence (AOF) so a restart loses no accepted job.",
    )
    redis_url_env: str | None = Field(
        default=None, description="Name of an environment variable holding the Redis URL."
    )
    key_prefix: str = Field(
        default="image-service:video:", description="Prefix of the job records' Redis keys."
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Runs of one job: a replica lost mid-job gives the job to another, up to "
        "this many runs in all; then the job fails with `error.code` `attempts_exhausted`.",
    )
    lease_s: float = Field(
        default=60.0,
        gt=0,
        description="A running job's claim lasts this long past its last step: a second "
        "delivery of the job within it leaves the job to the replica running it.",
    )
    redelivery_s: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds after which a job taken by a replica that never finished it is "
        "given to another (Celery's visibility timeout): above the longest job's run time.",
    )
    webhooks: list[WebhookEndpointConfig] = Field(
        default_factory=list, description="Receivers of every job's final event."
    )
    webhook_max_attempts: int = Field(
        default=6, ge=1, description="Tries of one webhook delivery, with exponential backoff."
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        return None if value is None else check_redis_url(value)

    @model_validator(mode="after")
    def _one_redis_and_distinct_models(self) -> VideoConfig:
        if (self.redis_url is None) == (self.redis_url_env is None):
            raise ValueError("videos needs exactly one of redis_url and redis_url_env")
        names = [video_deployment_name(model.id) for model in self.models]
        if len(set(names)) != len(names):
            raise ValueError("videos.models: two models have the same id")
        if self.lease_s >= self.redelivery_s:
            raise ValueError("videos: lease_s must be shorter than redelivery_s")
        return self

    def resolved_redis_url(self) -> str:
        """`redis_url`, or the URL in `redis_url_env` (read where it is called)."""
        return redis_url_from(self.redis_url, self.redis_url_env)

    def model_by_id(self) -> dict[str, VideoModelConfig]:
        return {model.id: model for model in self.models}

    def queue_name(self, model_id: str) -> str:
        """The queue of a model's jobs (one per model, so only its replicas take them)."""
        return f"{self.key_prefix}queue:{_safe(model_id)}"

    def deployment_options(
        self, model: VideoModelConfig, overrides: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The model's Serve options: `deployment` then `overrides`, its concurrency, and the
        policy that scales on its queue and running jobs (`deployments/videos/queue_policy.py`)
        in an `autoscaling_config` that names none. The policy is given `redis_url_env`, not
        the URL in it, when the config names a variable: no password lands in Serve's config."""
        options = {**model.deployment, **(overrides or {})}
        options["max_ongoing_requests"] = model.jobs_per_replica
        autoscaling = options.get("autoscaling_config")
        if isinstance(autoscaling, Mapping) and "policy" not in autoscaling:
            options["autoscaling_config"] = {
                **autoscaling,
                "policy": {
                    "policy_function": "deployments.videos.queue_policy:VideoQueuePolicy",
                    "policy_kwargs": {
                        "queue_name": self.queue_name(model.id),
                        "redis_url": self.redis_url,
                        "redis_url_env": self.redis_url_env,
                    },
                },
            }
        return options


def redis_url_from(redis_url: str | None, redis_url_env: str | None) -> str:
    """The URL given, or the one in the environment variable named, read where this runs
    (a replica, or Serve's controller for the autoscaling policy)."""
    if redis_url:
        return redis_url
    value = os.environ.get(redis_url_env or "", "")
    if not value:
        raise ValueError(f"videos.redis_url_env: ${redis_url_env} is not set")
    return check_redis_url(value)


def _safe(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)


def video_deployment_name(model_id: str) -> str:
    """`VideoGenerator:<id>`, with characters outside letters, digits, `-_.` as `_`."""
    return f"{VIDEO_DEPLOYMENT}:{_safe(model_id)}"
