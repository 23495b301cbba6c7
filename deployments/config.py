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
from typing import Any, Literal

import diffusers
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve.schema import DeploymentSchema

from deployments.embedded_model import default_cache_dir


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """A model the service serves: what its generator replicas load, the defaults of its
    requests, and the Ray Serve options of its own generator deployment."""

    id: str = Field(
        default="tiny-sd3",
        min_length=1,
        description="The name clients pass as `model` and `GET /v1/models` lists.",
    )
    source: str = Field(
        default="embedded:tiny-sd3",
        min_length=1,
        description=(
            "Where the weights come from: a Hugging Face hub id "
            "(`stabilityai/stable-diffusion-3.5-medium`), a local directory written by "
            "`save_pretrained`, or `embedded:tiny-sd3`, `embedded:tiny-sdxl`, "
            "`embedded:tiny-flux` for the built-in tiny models."
        ),
    )
    pipeline_class: str | None = Field(
        default=None,
        description="The diffusers text-to-image pipeline class to load it with "
        "(`StableDiffusionXLPipeline`, `FluxPipeline`, ...). By default the class named in "
        "the checkpoint's `model_index.json`, as diffusers' `DiffusionPipeline` chooses it.",
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) to load; hub ids only."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Weight dtype. `auto` is bfloat16 on CUDA and float32 elsewhere.",
    )
    device: str = Field(
        default="auto",
        description="Torch device (`cuda`, `cuda:1`, `mps`, `cpu`). `auto` picks CUDA, then MPS, "
        "then CPU.",
    )
    owned_by: str = Field(
        default="image-service", description="The `owned_by` field of `GET /v1/models`."
    )
    default_size: str = Field(
        default="64x64",
        pattern=r"^\d+x\d+$",
        description="Image size (`WxH`) used when a request says `size: auto` or none.",
    )
    size_multiple: int = Field(
        default=16,
        ge=1,
        description="Width and height must be multiples of this: the VAE's downsampling "
        "factor times the transformer's patch size (16 for SD3).",
    )
    default_steps: int = Field(default=4, ge=1, description="Denoising steps when not given.")
    default_guidance_scale: float = Field(
        default=7.0, ge=0, description="Classifier-free guidance scale when not given."
    )
    default_strength: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="For edits: how much of the input image is redrawn when not given.",
    )
    deployment: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray Serve options of this model's generator deployment, as in a config's "
        "`deployments:` entry (`num_replicas` or `autoscaling_config`, `ray_actor_options` "
        "with `num_gpus`, `max_ongoing_requests`, `max_queued_requests`, ...). Unset options "
        "keep the defaults of `deployments/generator.py`.",
    )

    @field_validator("pipeline_class")
    @classmethod
    def _known_pipeline_class(cls, value: str | None) -> str | None:
        if value is None:
            return value
        found = getattr(diffusers, value, None)
        if not (isinstance(found, type) and issubclass(found, diffusers.DiffusionPipeline)):
            raise ValueError(f"diffusers has no pipeline class named {value!r}")
        return value

    @field_validator("deployment")
    @classmethod
    def _valid_deployment_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        known = set(DeploymentSchema.model_fields) - {"name"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown deployment option(s): {', '.join(unknown)}")
        DeploymentSchema.model_validate({"name": "generator", **value})  # Ray's own checks
        return value


class RequestLimits(_Strict):
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


class StorageConfig(_Strict):
    """Where `response_format: url` images are kept, and for how long."""

    directory: str | None = Field(
        default=None,
        description="Directory for stored images; default `<cache>/images`, where <cache> is "
        "`$IMAGE_SERVICE_CACHE` or `~/.cache/image-service`. Several nodes need a shared "
        "volume here.",
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

    def resolved_directory(self) -> Path:
        return Path(self.directory) if self.directory else default_cache_dir() / "images"


class AuthConfig(_Strict):
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

    @property
    def enabled(self) -> bool:
        return self.api_keys_env is not None or self.api_keys_file is not None


class CORSConfig(_Strict):
    """Cross-origin access for browser pages served from other origins. Off by default."""

    allow_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (`https://app.example.com`,"
        " or `*` for any). Empty turns CORS off.",
    )
    max_age_s: int = Field(
        default=600, ge=0, description="How long browsers may cache a preflight answer."
    )


class RequestLogConfig(_Strict):
    """The one log line each image request gets (see `deployments/request_log.py`)."""

    include_prompts: bool = Field(
        default=False,
        description="Write `prompt` and `negative_prompt` into the line. Off by default: "
        "prompts can be personal data; the line has their length instead.",
    )


class BatchingConfig(_Strict):
    """How a generator replica groups compatible requests into one pipeline call."""

    max_batch_images: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Most images in one pipeline call. 1 turns batching off: every request "
        "runs alone (the per-request design).",
    )
    max_batch_pixels: int = Field(
        default=8 * 256 * 256,
        ge=1,
        description="Most pixels (width x height x images) in one pipeline call. Large images "
        "fill the device alone, so batching them only adds latency and memory; this keeps "
        "them in small batches or alone.",
    )
    max_wait_ms: float = Field(
        default=25.0,
        ge=0,
        le=1000,
        description="How long a batch waits for compatible requests while the replica is "
        "busy. An idle replica starts a lone request at once.",
    )


class AppArgs(_Strict):
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
        description="Batching of compatible requests (on every model's replicas).",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys (off by default).")
    cors: CORSConfig = Field(default_factory=CORSConfig, description="CORS (off by default).")
    request_logs: RequestLogConfig = Field(
        default_factory=RequestLogConfig, description="Per-request log lines."
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
        "its own thread. Requests beyond these wait inside the replica.",
    )

    @property
    def default_model_id(self) -> str:
        return self.default_model or self.models[0].id

    def model_by_id(self) -> dict[str, ModelConfig]:
        return {model.id: model for model in self.models}

    @model_validator(mode="after")
    def _models_fit_the_service(self) -> AppArgs:
        ids = [model.id for model in self.models]
        if len({generator_deployment_name(model_id) for model_id in ids}) != len(ids):
            raise ValueError(f"models: two models have the same id ({', '.join(ids)})")
        if self.default_model is not None and self.default_model not in ids:
            raise ValueError(f"default_model {self.default_model!r} is not one of the models")
        for model in self.models:
            self._check_defaults(model)
        return self

    def _check_defaults(self, model: ModelConfig) -> None:
        name = f"model {model.id!r}"
        if model.default_steps > self.limits.max_steps:
            raise ValueError(
                f"{name}: default_steps ({model.default_steps}) exceeds limits.max_steps "
                f"({self.limits.max_steps})"
            )
        if model.default_guidance_scale > self.limits.max_guidance_scale:
            raise ValueError(
                f"{name}: default_guidance_scale ({model.default_guidance_scale}) exceeds "
                f"limits.max_guidance_scale ({self.limits.max_guidance_scale})"
            )
        width, height = (int(side) for side in model.default_size.split("x"))
        multiple = model.size_multiple
        if width % multiple or height % multiple:
            raise ValueError(
                f"{name}: default_size {model.default_size} is not a multiple of "
                f"size_multiple ({multiple})"
            )
        if width * height > self.limits.max_pixels:
            raise ValueError(
                f"{name}: default_size {model.default_size} exceeds limits.max_pixels "
                f"({self.limits.max_pixels})"
            )


GENERATOR_DEPLOYMENT = "ImageGenerator"


def generator_deployment_name(model_id: str) -> str:
    """The name of a model's generator deployment: `ImageGenerator:<id>`, with any character
    of the id outside letters, digits, `-`, `_` and `.` as `_`."""
    return f"{GENERATOR_DEPLOYMENT}:{re.sub(r'[^A-Za-z0-9_.-]', '_', model_id)}"
