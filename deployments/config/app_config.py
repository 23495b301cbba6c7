"""The application's arguments: what a Serve config's `args:` may say, typed and documented.

`serve_app.build_app` validates `args:` against `AppArgs`. Every field has a default or is
required, every field has a description, and unknown keys are rejected (a misspelt option
must fail the deployment, not be silently ignored). Ray Serve's own deployment options
(replicas, autoscaling, `max_ongoing_requests`, `ray_actor_options`) are not here: they go in
the config's `deployments:` list, where Ray validates them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from deployments.config.base import Strict, default_cache_dir
from deployments.config.model_config import BatchingConfig, ModelConfig, generator_deployment_name
from deployments.config.quota_config import QuotaConfig
from deployments.config.safety_config import PromptModerationConfig
from deployments.config.scheduling_config import SchedulingConfig
from deployments.config.video_config import VideoConfig
from deployments.sizes import parse_size


class RequestLimits(Strict):
    """Bounds on what one request may ask for; exceeding one is a 400 naming the parameter."""

    max_prompt_chars: int = Field(
        default=4000, ge=1, description="Longest `prompt` and `negative_prompt`, in characters."
    )
    max_images: int = Field(
        default=10, ge=1, le=10, description="Largest `n` (OpenAI allows 1-10)."
    )
    max_pixels: int = Field(
        default=1024 * 1024,
        ge=1,
        description="Largest width x height of one image.",
    )
    max_steps: int = Field(default=50, ge=1, description="Largest `num_inference_steps`.")
    max_guidance_scale: float = Field(default=20.0, ge=0, description="Largest `guidance_scale`.")
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest JSON request body, in bytes; a larger one gets 413 before it is read.",
    )
    max_upload_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Largest `POST /v1/images/edits` body (its images and fields), in bytes; "
        "a larger one gets 413.",
    )
    max_input_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description="Largest width x height of an uploaded image or mask (it is scaled to the "
        "output size, at most `max_pixels`).",
    )


# Keys that name a credential. Credentials never go in a config (it is in Git, in the Ray
# dashboard and in every replica's args): boto3 reads them from the environment or the pod's
# role. A misspelt key is refused anyway; these get a message that says where they belong.
_CREDENTIAL_KEY = re.compile(r"access_?key|secret|session_?token|password|credential", re.I)


class S3Config(Strict):
    """An S3-compatible bucket for `response_format: url` images (AWS S3, GCS through its S3
    interface, MinIO, Cloudflare R2).

    Credentials are not configured here: boto3's default chain finds them
    (`AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` in the ingress's environment, a shared
    credentials file, or the pod's or instance's role).
    """

    bucket: str = Field(
        min_length=3,
        max_length=63,
        description="The bucket (required; it must exist: the ingress checks at start that it "
        "can reach it).",
    )
    prefix: str = Field(
        default="images/",
        description="Prefix of the images' keys. A lifecycle rule on it deletes expired images "
        "(docs/object-storage.md).",
    )
    endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="The S3 API's URL. Unset: AWS S3 of the region. "
        "`https://storage.googleapis.com` for GCS, `https://<account>.r2.cloudflarestorage.com`"
        " for R2, e.g. `http://minio:9000` for MinIO.",
    )
    region: str | None = Field(
        default=None,
        description="The bucket's region. Unset: boto3's default (`AWS_REGION`, "
        "`AWS_DEFAULT_REGION` or its config file). `auto` for GCS and R2.",
    )
    addressing_style: Literal["auto", "virtual", "path"] = Field(
        default="auto",
        description="`virtual`: the bucket in the host name (`bucket.endpoint`); `path`: in the "
        "path (`endpoint/bucket`), as MinIO without DNS for buckets needs; `auto`: boto3's "
        "choice.",
    )
    connect_timeout_s: float = Field(
        default=2.0, gt=0, description="Seconds to wait for a connection to the store."
    )
    read_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds to wait for the store's answer on an open connection.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Attempts of each call to the store, the first included (botocore's "
        "`standard` retries: connection errors, timeouts, throttling and 5xx, with backoff).",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: object) -> object:
        if isinstance(data, dict):
            named = sorted(str(key) for key in data if _CREDENTIAL_KEY.search(str(key)))
            if named:
                raise ValueError(
                    f"{', '.join(named)}: credentials do not go in the config; the ingress "
                    "reads them from its environment (AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY) or its pod's role"
                )
        return data

    @model_validator(mode="after")
    def _relative_prefix(self) -> S3Config:
        if self.prefix.startswith("/"):
            raise ValueError("prefix: a key prefix does not start with '/'")
        return self


class StorageConfig(Strict):
    """Where `response_format: url` images are kept, and for how long: a directory (the
    default) or, with `s3`, a bucket that every ingress replica reaches."""

    directory: str | None = Field(
        default=None,
        description="Directory for stored images; default `<cache>/images`, where <cache> is "
        "`$IMAGE_SERVICE_CACHE` or `~/.cache/image-service`. Several nodes need a shared "
        "volume here (or `s3`).",
    )
    s3: S3Config | None = Field(
        default=None,
        description="Keep the images in an S3-compatible bucket instead of a directory (see "
        "`S3Config`, docs/object-storage.md). Unset: the directory.",
    )
    ttl_s: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds a stored image stays retrievable (OpenAI's URLs last an hour).",
    )
    public_base_url: str | None = Field(
        default=None,
        description="Base of the returned URLs (e.g. `https://images.example.com`). By default "
        "the URL the request came in on.",
    )
    max_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Most bytes the stored images may take; after each save the oldest go "
        "first until the rest fit (the newest image is kept even if it alone is larger). "
        "Unset: bounded by the TTL alone. With several replicas on one volume, each applies it. "
        "Directory only.",
    )

    @model_validator(mode="after")
    def _one_backend(self) -> StorageConfig:
        if self.s3 is not None and self.directory is not None:
            raise ValueError("set either directory or s3, not both")
        if self.s3 is not None and self.max_bytes is not None:
            # Counting a bucket's bytes means listing it on every save; a bucket's size is
            # bounded by its lifecycle rule and the TTL instead.
            raise ValueError(
                "max_bytes applies to a directory only; a bucket is bounded by "
                "its lifecycle rule (docs/object-storage.md)"
            )
        return self

    def resolved_directory(self) -> Path:
        return Path(self.directory) if self.directory else default_cache_dir() / "images"


class AuthConfig(Strict):
    """API keys that `/v1/` requests must present as `Authorization: Bearer <key>`.

    Off when neither source is set. When one is set and holds no key, the ingress refuses to
    start: a service meant to be closed must never run open by mistake.
    """

    api_keys_env: str | None = Field(
        default=None,
        description="Name of an environment variable holding the accepted keys, separated by "
        "commas or whitespace (e.g. `IMAGE_SERVICE_API_KEYS`).",
    )
    api_keys_file: str | None = Field(
        default=None,
        description="Path of a file holding the accepted keys, one per line (e.g. a mounted "
        "Kubernetes Secret). Re-read when it changes, so keys rotate without a restart.",
    )
    quotas: QuotaConfig | None = Field(
        default=None,
        description="Rate and concurrency limits per key, counted in Redis (off by default; "
        "see docs/usage-and-quotas.md).",
    )

    @property
    def enabled(self) -> bool:
        return self.api_keys_env is not None or self.api_keys_file is not None

    @model_validator(mode="after")
    def _quotas_need_keys(self) -> AuthConfig:
        if self.quotas is not None and not self.enabled:
            raise ValueError("auth.quotas needs API keys (api_keys_env or api_keys_file)")
        return self


class CORSConfig(Strict):
    """Cross-origin access for browser pages served from other origins. Off by default."""

    allow_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (`https://app.example.com`,"
        " or `*` for any). Empty turns CORS off.",
    )
    max_age_s: int = Field(
        default=600, ge=0, description="How long browsers may cache a preflight answer."
    )


class RequestLogConfig(Strict):
    """The one log line each image request gets (see `deployments/ingress/request_log.py`)."""

    include_prompts: bool = Field(
        default=False,
        description="Write `prompt` and `negative_prompt` into the line. Off by default: "
        "prompts can be personal data; the line has their length instead.",
    )


class AppArgs(Strict):
    """`args:` of `import_path: serve_app:build_app`."""

    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig()],
        min_length=1,
        description="The models to serve, each on its own generator deployment (so each "
        "scales on its own); requests choose one by `model`.",
    )
    default_model: str | None = Field(
        default=None,
        description="The `id` of the model for requests that name none; the first model "
        "when unset.",
    )
    limits: RequestLimits = Field(
        default_factory=RequestLimits, description="Bounds on request parameters."
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Storage of `url` images."
    )
    batching: BatchingConfig = Field(
        default_factory=BatchingConfig,
        description="Batching of compatible requests: the default of every model that sets "
        "no `batching` of its own.",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys (off by default).")
    prompt_moderation: PromptModerationConfig | None = Field(
        default=None,
        description="A blocklist every prompt is checked against before any compute; off by "
        "default.",
    )
    scheduling: SchedulingConfig = Field(
        default_factory=SchedulingConfig,
        description="Priority classes and deadlines: the order a replica starts waiting "
        "work in, and refusing what cannot finish in time.",
    )
    cors: CORSConfig = Field(default_factory=CORSConfig, description="CORS (off by default).")
    request_logs: RequestLogConfig = Field(
        default_factory=RequestLogConfig, description="Per-request log lines."
    )
    videos: VideoConfig | None = Field(
        default=None,
        description="Video models, served as jobs by the Videos API (`/v1/videos`); unset: "
        "no video.",
    )
    playground: bool = Field(
        default=True,
        description="Serve the playground page at `/` (static files; the API calls it makes "
        "still need a key when auth is on).",
    )
    request_timeout_s: float = Field(
        default=110.0,
        gt=0,
        description="Seconds the ingress waits for a request's images before answering 504 in "
        "the API's error shape and cancelling its generation. Keep it below "
        "`http_options.request_timeout_s`, where Ray's proxy answers a plain-text 408.",
    )
    worker_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Pipeline calls (batches) one generator replica runs at once, each in "
        "its own thread; the default of every model that sets no `worker_threads` of its "
        "own. Requests beyond these wait inside the replica.",
    )

    @property
    def default_model_id(self) -> str:
        return self.default_model or self.models[0].id

    def engine_settings(self, model: ModelConfig) -> tuple[int, BatchingConfig]:
        """The worker threads and batching of `model`'s replicas: its own, else the app's."""
        return (
            model.worker_threads or self.worker_threads,
            model.batching or self.batching,
        )

    def model_by_id(self) -> dict[str, ModelConfig]:
        return {model.id: model for model in self.models}

    @model_validator(mode="after")
    def _models_fit_the_service(self) -> AppArgs:
        ids = [model.id for model in self.models]
        if len({generator_deployment_name(model_id) for model_id in ids}) != len(ids):
            raise ValueError(f"models: two models have the same id ({', '.join(ids)})")
        adapter_ids = [adapter.id for model in self.models for adapter in model.adapters]
        if len(set(ids + adapter_ids)) != len(ids) + len(adapter_ids):
            # A request's `model` names either; `GET /v1/models` lists both.
            raise ValueError("adapters: an adapter id repeats another adapter's or a model's id")
        if self.default_model is not None and self.default_model not in ids:
            raise ValueError(f"default_model {self.default_model!r} is not one of the models")
        for model in self.models:
            self._check_defaults(model)
        return self

    @model_validator(mode="after")
    def _priority_keys_need_keys(self) -> AppArgs:
        if self.scheduling.keys and not self.auth.enabled:
            raise ValueError("scheduling.keys needs API keys (auth.api_keys_env or _file)")
        return self

    def _check_defaults(self, model: ModelConfig) -> None:
        name = f"model {model.id!r}"
        if model.default_steps > self.limits.max_steps:
            raise ValueError(
                f"{name}: default_steps ({model.default_steps}) exceeds limits.max_steps "
                f"({self.limits.max_steps})"
            )
        for quality in ("low", "medium", "high"):
            steps = model.quality_steps.steps(quality, model.default_steps)
            if steps > self.limits.max_steps:
                raise ValueError(
                    f"{name}: quality_steps.{quality} ({steps}) exceeds limits.max_steps "
                    f"({self.limits.max_steps})"
                )
        if model.default_guidance_scale > self.limits.max_guidance_scale:
            raise ValueError(
                f"{name}: default_guidance_scale ({model.default_guidance_scale}) exceeds "
                f"limits.max_guidance_scale ({self.limits.max_guidance_scale})"
            )
        try:
            parse_size(
                model.default_size,
                default=model.default_size,
                multiple=model.size_multiple,
                max_pixels=self.limits.max_pixels,
            )
        except ValueError as error:
            raise ValueError(f"{name}: default_size: {error} (limits.max_pixels)") from None
