"""The HTTP API's request and response schemas, in the shape of OpenAI's Images API.

Standard OpenAI fields come first, in OpenAI's order; this service's extensions follow,
marked as such. Bounds that depend on the deployment (prompt length, size, steps) come from
`RequestLimits` and `ModelConfig`, passed as pydantic's validation context, so every bad
input is rejected here, in one place, before anything is queued.
"""

from __future__ import annotations

import json
import secrets
from typing import Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from deployments.config.model_config import ModelConfig
from deployments.ingress.validation.validation_context import (
    ValidationContext,
    context_of,
    resolve_size_in,
)
from deployments.jobs import AdapterWeight, GenerationJob, ModelCapabilities

MAX_SEED = 2**32 - 1
# Longest `lora` list as an edit form's JSON text (a few adapters fit in far less).
MAX_LORA_TEXT = 4096


def without_unused_form(data: dict) -> dict:
    """An image's serialized fields without whichever of `b64_json` and `url` is unset."""
    for key in ("b64_json", "url"):
        if data.get(key) is None:
            data.pop(key, None)
    return data


class LoraReference(BaseModel):
    """Extension: one LoRA adapter a request applies, and how strongly."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="An adapter's id.")
    scale: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="Its strength: 0 is the base model, 1 the adapter as trained; the "
        "adapter's configured scale when omitted. Rounded to two decimals.",
    )


_LORA_LIST = TypeAdapter(list[LoraReference])


class ImageRequest(BaseModel):
    """The fields that generations and edits share, in OpenAI's order, then the extensions."""

    model_config = ConfigDict(extra="forbid")

    # --- OpenAI fields ---
    prompt: str = Field(description="What to draw. Required, non-empty.")
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        default=None,
        description="`opaque` and `auto` are served (the models make opaque images); "
        "`transparent` is a 400 naming it.",
    )
    model: str | None = Field(
        default=None, description="Which model; the service's default model when omitted."
    )
    n: int = Field(default=1, ge=1, le=10, description="How many images (1-10).")
    output_compression: int = Field(
        default=100,
        ge=0,
        le=100,
        description="Quality of jpeg and webp output, 0-100 (100 keeps the most detail). "
        "Ignored for png.",
    )
    output_format: Literal["png", "jpeg", "webp"] = Field(
        default="png", description="Encoding of the returned images."
    )
    partial_images: int = Field(
        default=0,
        ge=0,
        le=3,
        description="With `stream`, how many previews of each image to send while it is "
        "generated (0-3). Fewer come when the model runs too few steps.",
    )
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = Field(
        default=None,
        description="The model's step preset (`models[].quality_steps`): `low` fewer steps, "
        "`medium`/`standard` and `auto` its default, `high`/`hd` as configured. "
        "`num_inference_steps`, when given, wins.",
    )
    response_format: Literal["url", "b64_json"] = Field(
        default="url",
        description="`url`: the service stores the image and returns a link to it. "
        "`b64_json`: the encoded image inline.",
    )
    size: str = Field(
        default="auto",
        description="`WIDTHxHEIGHT` (multiples of the model's size multiple) or `auto` for "
        "the model's default size (for edits: the input image's size, scaled to fit).",
    )
    stream: bool = Field(
        default=False,
        strict=True,
        description="Answer with server-sent events: `partial_image` previews, then one "
        "`completed` event per image.",
    )
    user: str | None = Field(
        default=None, max_length=256, description="An end-user id, logged for tracing."
    )
    safety_identifier: str | None = Field(
        default=None,
        max_length=256,
        description="OpenAI's successor of `user`: an end-user id (hashed by the client), "
        "logged for tracing.",
    )

    # --- Extensions of this service ---
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Seed of the first image; image i uses (seed + i) mod 2**32; random when "
        "omitted. Alone, the same request gives the same bytes; batched with others, within "
        "one level of 255 in at most 0.1% of values (CPU float32; design note 8).",
    )
    negative_prompt: str | None = Field(default=None, description="What not to draw.")
    num_inference_steps: int | None = Field(
        default=None, ge=1, description="Denoising steps; the model's default when omitted."
    )
    guidance_scale: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Classifier-free guidance scale; the model's default when omitted.",
    )
    stream_progress: bool = Field(
        default=False,
        strict=True,
        description="With `stream`, also send `progress` events (denoising step of total) a "
        "few times a second.",
    )
    lora: list[LoraReference] | None = Field(
        default=None,
        description='LoRA adapters of the model to compose, `[{"name": ..., "scale": ...}]` '
        "(`GET /v1/models` lists them with their model as `parent`); in an edit's form, "
        "the same list as JSON text. With `model` naming an adapter, these are added to it.",
    )

    def output_size(
        self, context: ValidationContext, input_size: tuple[int, int] | None = None
    ) -> tuple[int, int]:
        """(width, height) of the images: the `size` asked for, or for `auto` the model's
        default size or, for an edit, its input image's size fitted to the model's rules."""
        return resolve_size_in(self.size, context, input_size)

    def to_job(
        self,
        context: ValidationContext,
        request_id: str,
        *,
        image: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        references: tuple[np.ndarray, ...] = (),
        input_size: tuple[int, int] | None = None,
        adapters: tuple[AdapterWeight, ...] = (),
    ) -> GenerationJob:
        """The generator's job for this validated request, with the model's defaults filled
        in. An edit's `image` and `mask` must already be at `output_size(context, input_size)`
        (a reference-conditioned model's edit has `references` instead, and no strength);
        `adapters` are its LoRA adapters as the service resolved them (`resolve_adapters`).
        """
        model = context.model
        width, height = self.output_size(context, input_size)
        first_seed = self.seed if self.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return GenerationJob(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            num_inference_steps=self.steps(model),
            guidance_scale=(
                self.guidance_scale
                if self.guidance_scale is not None
                else model.default_guidance_scale
            ),
            seeds=tuple((first_seed + i) % (MAX_SEED + 1) for i in range(self.n)),
            request_id=request_id,
            partial_images=self.partial_images,
            image=image,
            mask=mask,
            strength=self.edit_strength(model) if image is not None else None,
            references=references,
            adapters=adapters,
            moderation=self.moderation_level,
        )

    @property
    def moderation_level(self) -> Literal["auto", "low"]:
        """The safety thresholds the request's images are checked with (edits: `auto`)."""
        return "auto"

    def steps(self, model: ModelConfig) -> int:
        """The denoising steps asked for: `num_inference_steps`, else the model's preset for
        `quality`, else its default."""
        if self.num_inference_steps:
            return self.num_inference_steps
        return model.quality_steps.steps(self.quality, model.default_steps)

    def edit_strength(self, model: ModelConfig) -> float | None:
        """How much of an input image an edit redraws (edits only)."""
        return None

    def streaming_option_without_stream(self) -> str | None:
        """The name of a streaming option given without `stream`, if any."""
        if not self.stream:
            for name in ("partial_images", "stream_progress"):
                if getattr(self, name):
                    return name
        return None

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _bounded_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if info.field_name == "prompt" and not value.strip():
            raise ValueError("must not be empty")
        limit = context_of(info).limits.max_prompt_chars
        if len(value) > limit:
            raise ValueError(f"is {len(value)} characters long; the limit is {limit}")
        return value

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_from_form_text(cls, value: object) -> object:
        # A form field is text: an edit sends the list as JSON.
        if isinstance(value, str):
            if len(value) > MAX_LORA_TEXT:
                raise ValueError(f"is longer than {MAX_LORA_TEXT} characters")
            try:
                parsed = json.loads(value)
            except (ValueError, RecursionError):  # deep nesting is a RecursionError
                raise ValueError("must be a JSON list of {name, scale} objects") from None
            # JSON, so taken strictly as a JSON body is (`"0.5"` and `true` are no numbers),
            # though the form's other fields are text and converted.
            try:
                return _LORA_LIST.validate_python(parsed, strict=True)
            except ValidationError as error:
                problem = error.errors(include_url=False, include_input=False)[0]
                where = ".".join(str(part) for part in problem["loc"])
                raise ValueError(
                    f"{where}: {problem['msg']}" if where else problem["msg"]
                ) from None
        return value

    @field_validator("n")
    @classmethod
    def _n_within_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = context_of(info).limits.max_images
        if value > limit:
            raise ValueError(f"this service generates at most {limit} images per request")
        return value

    @field_validator("size")
    @classmethod
    def _valid_size(cls, value: str, info: ValidationInfo) -> str:
        if value != "auto":  # `auto` is the model's default size, or an edit's input's
            resolve_size_in(value, context_of(info))
        return value

    @field_validator("num_inference_steps")
    @classmethod
    def _steps_within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = context_of(info).limits.max_steps
        if value is not None and value > limit:
            raise ValueError(f"must be at most {limit}")
        return value

    @field_validator("guidance_scale")
    @classmethod
    def _guidance_within_limit(cls, value: float | None, info: ValidationInfo) -> float | None:
        limit = context_of(info).limits.max_guidance_scale
        if value is not None and value > limit:
            raise ValueError(f"must be at most {limit}")
        return value


class ImageGenerationRequest(ImageRequest):
    """Body of `POST /v1/images/generations` (JSON)."""

    # --- OpenAI fields, in OpenAI's order among those above ---
    moderation: Literal["auto", "low"] | None = Field(
        default=None,
        description="`auto` (the default): the model's safety thresholds. `low`: its relaxed "
        "ones, where its `safety.low_thresholds` are set and the API key may ask "
        "(`safety.low_key_sha256`); otherwise a 400 naming it.",
    )
    style: Literal["vivid", "natural"] | None = Field(
        default=None,
        description="DALL-E 3's style; these models have none, so it is a 400 naming it.",
    )

    @property
    def moderation_level(self) -> Literal["auto", "low"]:
        return self.moderation or "auto"


class ImageEditRequest(ImageRequest):
    """The fields of `POST /v1/images/edits` (multipart form) besides its files: `image` (or
    `image[]`) and the optional `mask`, which `deployments/ingress/uploads.py` reads."""

    # --- Extension ---
    strength: float | None = Field(
        default=None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="How much of the image to redraw, (0, 1]: 1 ignores the input's content, "
        "small values keep it. Runs `num_inference_steps x strength` steps. The model's "
        "`default_strength` when omitted.",
    )

    input_fidelity: Literal["high", "low"] | None = Field(
        default=None,
        description="How closely to keep the input image: `high` redraws less (the model's "
        "`high_fidelity_strength`, 0.5 by default), `low` its `default_strength`. With "
        "`strength` it is a 400 (give one); on a model without `strength`, a 400 naming it.",
    )

    def edit_strength(self, model: ModelConfig) -> float | None:
        if self.strength is not None:
            return self.strength
        if self.input_fidelity == "high":
            return model.high_fidelity_strength
        return model.default_strength


class Image(BaseModel):
    """One generated image: exactly one of `url` and `b64_json` is set."""

    # --- OpenAI fields ---
    b64_json: str | None = None
    revised_prompt: str | None = None
    url: str | None = None
    # --- Extension: the seed that made this image, to reproduce it ---
    seed: int

    @model_serializer(mode="wrap")
    def _omit_unused_form(self, handler: SerializerFunctionWrapHandler) -> dict:
        # Like OpenAI, send only the form asked for; `revised_prompt` stays (always null).
        return without_unused_form(handler(self))


class InputTokensDetails(BaseModel):
    image_tokens: int = Field(description="Uploaded images of an edit: 1 each (image, mask).")
    text_tokens: int = Field(description="Prompt and negative prompt, by the model's tokenizer.")


class Usage(BaseModel):
    """OpenAI's `usage`, in this service's units (docs/usage-and-quotas.md)."""

    input_tokens: int = Field(description="Text tokens plus image tokens.")
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(description="Image-steps: images x denoising steps each ran.")
    total_tokens: int = Field(description="Input tokens plus output tokens.")


class ImagesResponse(BaseModel):
    """Body of a successful `POST /v1/images/generations` or `/v1/images/edits`."""

    created: int = Field(description="Unix time, in seconds, when the images were made.")
    data: list[Image]
    output_format: Literal["png", "jpeg", "webp"]
    size: str = Field(description="The size of the images, `WIDTHxHEIGHT`.")
    usage: Usage


class ModelCapabilitiesCard(BaseModel):
    """Extension: what a model takes, as its loaded pipeline reported it."""

    tasks: list[str] = Field(description="`text-to-image`, `image-to-image`, `inpaint`.")
    parameters: dict[str, list[str]] = Field(
        description="For each task, the optional request parameters the model takes (others "
        "are refused naming them)."
    )
    guidance: str = Field(
        description="What `guidance_scale` does: `classifier-free` (with `negative_prompt` "
        "where taken), `true-cfg` (the pipeline's `true_cfg_scale`, with `negative_prompt`), "
        "`distilled` (an input of the model), or `none`."
    )
    size_multiple: int
    max_width: int | None
    max_height: int | None
    previews: bool = Field(description="Whether `partial_images` can be asked for.")
    reference_images: int = Field(
        description="How many images (`image[]`) an edit without a mask takes as references, "
        "for a model conditioned on input images (no `strength`); 0: an edit starts from its "
        "one image."
    )
    reference_max_aspect: float | None = Field(
        description="The most oblong reference it takes (`w:h` or `h:w`); null: any."
    )

    @classmethod
    def of(cls, capabilities: ModelCapabilities) -> ModelCapabilitiesCard:
        return cls(
            tasks=sorted(capabilities.tasks),
            parameters={task: sorted(taken) for task, taken in capabilities.tasks.items()},
            guidance=capabilities.guidance,
            size_multiple=capabilities.size_multiple,
            max_width=capabilities.max_width,
            max_height=capabilities.max_height,
            previews=capabilities.previews,
            reference_images=capabilities.reference_images,
            reference_max_aspect=capabilities.reference_max_aspect,
        )


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Extension (vLLM's convention): for a LoRA adapter, the model it applies to.
    parent: str | None = None
    # Extension: a model's capabilities, once one of its replicas has reported them.
    capabilities: ModelCapabilitiesCard | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The one error shape of the whole API (OpenAI's)."""

    error: ErrorDetail
