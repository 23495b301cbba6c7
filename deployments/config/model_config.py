"""A served model's part of the application's arguments: what its replicas load, how they
batch, and the defaults of its requests (`args.models[]` in a Serve config).

Both sides read it: the ingress for each model's request defaults and size rules, the
generator for what to load and how to run it. `deployments/config/app_config.py` holds the rest of
`args:`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from ray.serve.config import AutoscalingPolicy
from ray.serve.schema import DeploymentSchema

from deployments.autoscaling_policy import POLICY_FUNCTION
from deployments.config.base import Strict
from deployments.config.optimizations_config import OptimizationsConfig
from deployments.config.parallel_config import ParallelConfig, rank_bundle
from deployments.config.safety_config import PromptModerationConfig, SafetyConfig


class BatchingConfig(Strict):
    """How a generator replica groups compatible requests into one pipeline call."""

    max_batch_images: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Most images a batch gathers from several requests into one pipeline "
        "call. 1 turns batching off: every request runs alone (the per-request design), its "
        "`n` images in one call as `max_batch_pixels` allows.",
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
        "busy, and, after a batch ends, for that batch's callers to ask again. An idle "
        "replica starts a lone request at once.",
    )

    continuous: bool = Field(
        default=False,
        description="Step-level continuous batching for text-to-image on SD3, FLUX and "
        "Chroma: each worker thread runs one denoising loop that jobs join at the next "
        "step and leave when their own steps are done, mixing steps, guidance, negative "
        "prompts and adapters in one forward. With `optimizations.compile` each step's "
        "rows are padded to a few counts, all compiled at start. Edits, other families, and "
        "models with `optimizations.cache` keep the request-level batches "
        "(docs/continuous-batching.md).",
    )
    preempt_lower_classes: bool = Field(
        default=False,
        description="In the continuous loop, a step runs only the images of the most urgent "
        "priority class in flight across the replica's lanes; lower classes' images wait at "
        "the step boundary with their state kept, and a higher-class request joins a full "
        "loop beside them (docs/priorities.md). Pays where a step's cost grows with its "
        "images (CPUs, large images); where a step of several images costs about one, "
        "lower classes would ride along for free.",
    )

    def images_per_call(self, width: int, height: int) -> int:
        """Most images of this size in one pipeline call: the pixel budget, and at least 1 (a
        single image larger than `max_batch_pixels` still runs, alone). A request's own
        images are split into calls of this size, whatever `max_batch_images` says."""
        return max(1, self.max_batch_pixels // (width * height))

    def images_per_batch(self, width: int, height: int) -> int:
        """Most images of this size that a batch gathers from several requests."""
        return min(self.max_batch_images, self.images_per_call(width, height))


class AutoscalingPolicyConfig(Strict):
    """How Serve's autoscaler counts a model's load, when not by requests (its default).

    `cost_aware` counts the work the model's replicas hold in denoising steps x pixels
    (width x height x images x the steps each job still has to run), so that a few large
    requests scale out where as many small ones do not
    (`deployments/autoscaling_policy.py`). The rest of
    `deployment.autoscaling_config` applies as for Serve's own policy: `min_replicas`,
    `max_replicas`, the delays, the factors and `look_back_period_s`;
    `target_ongoing_requests` only decides until the first replica reports its work.
    """

    kind: Literal["cost_aware"] = Field(
        default="cost_aware",
        description="The policy: `cost_aware` (replicas = held steps x pixels / "
        "`target_step_pixels_per_replica`). A model without `autoscaling_policy` is scaled "
        "by Serve's default policy (ongoing requests / `target_ongoing_requests`).",
    )
    target_step_pixels_per_replica: float = Field(
        default=2 * 28 * 1024 * 1024,
        gt=0,
        description="The work each replica should hold, waiting and running, in steps x "
        "pixels: the default is two 28-step 1024x1024 images (58,720,256). About what one "
        "replica runs at once plus one call's worth waiting, as `target_ongoing_requests` "
        "would be set in requests.",
    )

    def serve_policy(self) -> dict[str, Any]:
        """`autoscaling_config.policy` for Serve: the policy class and its arguments."""
        return {
            "policy_function": POLICY_FUNCTION,
            "policy_kwargs": {
                "target_step_pixels_per_replica": self.target_step_pixels_per_replica
            },
        }


# An adapter id: letters, digits and `_ : / -`. A `+` joins the ids of a set of adapters,
# and peft cannot name an adapter with a `.` (torch module names cannot hold one).
ADAPTER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_:/-]*$"


class AdapterConfig(Strict):
    """A LoRA adapter of a model: clients pick it with `model: "<id>"` or compose it with
    others through `lora: [{"name": "<id>", "scale": ...}]`."""

    id: str = Field(
        pattern=ADAPTER_ID_PATTERN,
        max_length=200,
        description="The name clients pass; `GET /v1/models` lists it with its model as "
        "`parent`. Unique among the application's models and adapters.",
    )
    source: str = Field(
        min_length=1,
        description="Where its weights come from: a Hugging Face hub id, a local directory or "
        "`.safetensors` file (what `load_lora_weights` takes), or `embedded:<model>/<style>` "
        "for the built-in tiny adapters (`embedded:tiny-sd3/ink`, `embedded:tiny-sd3/paper`, "
        "`embedded:tiny-sdxl/ink`, `embedded:tiny-flux/ink`).",
    )
    weight_name: str | None = Field(
        default=None,
        description="The weights file inside `source` when it holds several (hub ids and "
        "directories).",
    )
    scale: float = Field(
        default=1.0,
        description='Its scale when a request gives none (with `model: "<id>"`, always).',
    )


class QualitySteps(Strict):
    """Denoising steps for OpenAI's `quality`, used when a request gives no
    `num_inference_steps` (which always wins). `standard` is `medium` and `hd` is `high`,
    as OpenAI's older models name them; `auto` is `default_steps`."""

    low: int | None = Field(
        default=None,
        ge=1,
        description="Steps for `quality: low`; half of `default_steps` (at least 1) when unset.",
    )
    medium: int | None = Field(
        default=None,
        ge=1,
        description="Steps for `quality: medium` and `standard`; `default_steps` when unset.",
    )
    high: int | None = Field(
        default=None,
        ge=1,
        description="Steps for `quality: high` and `hd`; `default_steps` when unset (a model's "
        "default is its quality; set more here where more steps pay).",
    )

    def steps(self, quality: str | None, default_steps: int) -> int:
        """The steps of `quality` (None or `auto`: `default_steps`)."""
        preset = {"standard": "medium", "hd": "high"}.get(quality or "", quality)
        if preset == "low":
            return self.low or max(1, default_steps // 2)
        if preset == "medium":
            return self.medium or default_steps
        if preset == "high":
            return self.high or default_steps
        return default_steps


class ModelConfig(Strict):
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
        # Only the name's shape here: the ingress reads this config too and must not import
        # diffusers (and torch) for it; the replica checks the class exists when it loads.
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
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
    quality_steps: QualitySteps = Field(
        default_factory=QualitySteps,
        description="Denoising steps for OpenAI's `quality` (`low`, `medium`, `high`) when a "
        "request gives no `num_inference_steps`.",
    )
    default_guidance_scale: float = Field(
        default=7.0, ge=0, description="Classifier-free guidance scale when not given."
    )
    default_strength: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="For edits: how much of the input image is redrawn when not given.",
    )
    high_fidelity_strength: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="An edit's `strength` when it asks for `input_fidelity: high` (keep "
        "more of the input) without a `strength`.",
    )
    batching: BatchingConfig | None = Field(
        default=None,
        description="How this model's replicas batch requests; `args.batching` when unset "
        "(a 28-step 1024x1024 model and a 4-step 512x512 one want different batches).",
    )
    worker_threads: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Pipeline calls one replica of this model runs at once; "
        "`args.worker_threads` when unset.",
    )
    optimizations: OptimizationsConfig = Field(
        default_factory=OptimizationsConfig,
        description="Speed levers of this model's replicas (compile, cache, attention "
        "backend, quantization, VAE tiling/slicing); all off by default.",
    )
    adapters: list[AdapterConfig] = Field(
        default_factory=list,
        description="LoRA adapters requests may apply to this model; none by default.",
    )
    adapter_directory: str | None = Field(
        default=None,
        description="A directory watched for more adapters, served without a redeploy: each "
        "`<id>.safetensors` file or `<id>/` directory (holding one) in it is adapter `<id>` "
        "at scale 1, seen within 2 s. Every replica and the ingress must see it (a shared "
        "volume on several nodes).",
    )
    max_adapters_per_replica: int = Field(
        default=4,
        ge=1,
        description="Adapters one replica keeps loaded; past it the least recently used one "
        "is unloaded. Requests are routed to replicas that hold their adapters.",
    )
    max_adapters_per_request: int = Field(
        default=3, ge=1, description="Most adapters one request may compose (`lora`)."
    )
    min_adapter_scale: float = Field(default=-2.0, description="Smallest `lora[].scale`.")
    max_adapter_scale: float = Field(default=2.0, description="Largest `lora[].scale`.")
    deployment: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray Serve options of this model's generator deployment, as in a config's "
        "`deployments:` entry (`num_replicas` or `autoscaling_config`, `ray_actor_options` "
        "with `num_gpus`, `max_ongoing_requests`, `max_queued_requests`, ...). Unset options "
        "keep the defaults of `deployments/generator/deployment.py`.",
    )
    prompt_moderation: PromptModerationConfig | None = Field(
        default=None,
        description="This model's own prompt blocklist, in place of the application's "
        "`prompt_moderation`; unset: the application's.",
    )
    safety: SafetyConfig | None = Field(
        default=None,
        description="An image classifier every image of this model passes before it leaves "
        "the replica (previews too); unset: none.",
    )
    parallel: ParallelConfig | None = Field(
        default=None,
        description="One replica over several devices: its ranks split each denoising "
        "step (context parallelism, CFG-parallel); unset: one device per replica.",
    )
    autoscaling_policy: AutoscalingPolicyConfig | None = Field(
        default=None,
        description="How the autoscaler counts this model's load: unset, Serve's default "
        "policy (ongoing requests); `{kind: cost_aware, target_step_pixels_per_replica: ...}` "
        "counts the work in steps x pixels. Needs `deployment.autoscaling_config`, without a "
        "`policy` of its own.",
    )

    def deployment_options(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The generator deployment's Serve options: `deployment`, then `overrides` (which
        replace whole options, as a config's `deployments:` entry does), with the
        `autoscaling_policy` in whichever `autoscaling_config` results."""
        options = {**self.deployment, **(overrides or {})}
        if self.parallel is not None and "placement_group_bundles" not in options:
            options.update(self.parallel.placement(options.get("ray_actor_options") or {}))
        autoscaling = options.get("autoscaling_config")
        if (
            self.autoscaling_policy is not None
            and isinstance(autoscaling, Mapping)
            and "policy" not in autoscaling
        ):
            options["autoscaling_config"] = {
                **autoscaling,
                "policy": self.autoscaling_policy.serve_policy(),
            }
        return options

    @model_validator(mode="after")
    def _adapters_fit(self) -> ModelConfig:
        ids = [adapter.id for adapter in self.adapters]
        if len(set(ids)) != len(ids):
            raise ValueError(f"adapters: two adapters have the same id ({', '.join(ids)})")
        if self.min_adapter_scale > self.max_adapter_scale:
            raise ValueError("min_adapter_scale is larger than max_adapter_scale")
        for adapter in self.adapters:
            if not self.min_adapter_scale <= adapter.scale <= self.max_adapter_scale:
                raise ValueError(
                    f"adapter {adapter.id!r}: scale {adapter.scale} is outside "
                    f"[min_adapter_scale, max_adapter_scale]"
                )
        has_adapters = bool(self.adapters or self.adapter_directory)
        if has_adapters and self.optimizations.compile:
            # Loading or switching an adapter changes the compiled modules: each would
            # recompile (or run stale graphs). Not supported yet.
            raise ValueError("adapters cannot be combined with optimizations.compile yet")
        if has_adapters and self.optimizations.quantization == "float8_weight_only":
            # int8 weights take LoRA through peft's torchao layers (checked on CPU: same images
            # alone and among concurrent calls, base unchanged); float8 needs a GPU to check.
            raise ValueError("adapters cannot be combined with float8 quantization yet")
        return self

    @model_validator(mode="after")
    def _parallel_fits(self) -> ModelConfig:
        if self.parallel is None:
            return self
        # Each rank holds its own denoiser: what a call changes on rank 0's (an adapter, a
        # cache's state, a compiled graph) the other ranks would not see.
        if self.adapters or self.adapter_directory:
            raise ValueError("parallel: adapters cannot be combined with parallel replicas yet")
        if self.optimizations.cache is not None or self.optimizations.compile:
            raise ValueError(
                "parallel: optimizations.cache and optimizations.compile cannot be combined "
                "with parallel replicas yet"
            )
        resources = self.deployment.get("ray_actor_options") or {}
        gpus = resources.get("num_gpus") or 0
        if gpus != int(gpus):
            # Two ranks on one GPU: NCCL refuses a group with a device twice.
            raise ValueError("parallel: each rank needs whole GPUs (ray_actor_options.num_gpus)")
        if not rank_bundle(resources):
            raise ValueError("parallel: each rank needs num_cpus or num_gpus above 0")
        bundles = self.deployment.get("placement_group_bundles")
        if bundles is not None and len(bundles) != self.parallel.world_size:
            raise ValueError(
                f"parallel: deployment.placement_group_bundles has {len(bundles)} bundles for "
                f"{self.parallel.world_size} ranks (one per rank, the replica's first)"
            )
        return self

    @model_validator(mode="after")
    def _autoscaling_policy_fits(self) -> ModelConfig:
        if self.autoscaling_policy is None:
            return self
        autoscaling = self.deployment.get("autoscaling_config")
        if not isinstance(autoscaling, Mapping):
            raise ValueError(
                "autoscaling_policy needs deployment.autoscaling_config (at least "
                "min_replicas and max_replicas): without it the replica count is fixed"
            )
        if "policy" in autoscaling:
            raise ValueError(
                "autoscaling_policy and deployment.autoscaling_config.policy both choose the "
                "policy: set one"
            )
        if "policy_kwargs" not in AutoscalingPolicy.model_fields:
            # Serve passes a class policy its arguments only since class-based policies came
            # in (ray-project/ray#60964); an older Ray would call the class with the context.
            raise ValueError("autoscaling_policy needs a Ray with class-based policies (2.60)")
        return self

    @field_validator("deployment")
    @classmethod
    def _valid_deployment_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        known = set(DeploymentSchema.model_fields) - {"name"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown deployment option(s): {', '.join(unknown)}")
        DeploymentSchema.model_validate({"name": "generator", **value})  # Ray's own checks
        return value


GENERATOR_DEPLOYMENT = "ImageGenerator"


def generator_deployment_name(model_id: str) -> str:
    """The name of a model's generator deployment: `ImageGenerator:<id>`, with any character
    of the id outside letters, digits, `-`, `_` and `.` as `_`."""
    return f"{GENERATOR_DEPLOYMENT}:{re.sub(r'[^A-Za-z0-9_.-]', '_', model_id)}"
