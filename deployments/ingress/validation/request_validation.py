"""A request's validation, in the order it runs.

1. `unicode_text.py`: text that is not text, anywhere in the body, refused by the service
   before it reads the body's `model` (so before this module's checks);
2. the schema (`deployments/ingress/protocol.py`): every field's type and bounds, against
   the config's limits and the model's own (`validation_context.py`); a streaming option
   without `stream`;
3. `model_checks.py`: what the model's pipeline takes (a parameter it would ignore, a task
   it has no pipeline for, an edit left with no step to run).

Each step refuses with a 400 that names the parameter. The model's own limits come from its
replicas once (`capabilities`); until they are known, the body is first checked against the
config alone, so a malformed request is a 400 at once rather than a wait for a starting
replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import ValidationError

from deployments.config.app_config import RequestLimits
from deployments.config.model_config import ModelConfig
from deployments.ingress.deadline import Deadline
from deployments.ingress.errors import from_validation_error, invalid_request
from deployments.ingress.protocol import ImageEditRequest, ImageGenerationRequest, ImageRequest
from deployments.ingress.validation.model_checks import (
    check_edit_steps,
    check_input_images,
    check_supported,
)
from deployments.ingress.validation.openai_fields import check_openai_fields
from deployments.ingress.validation.validation_context import ValidationContext
from deployments.jobs import ModelCapabilities, Task

Request = TypeVar("Request", bound=ImageRequest)
# Asks the model's replicas for what their loaded pipeline can do.
CapabilitiesOf = Callable[[], Awaitable[ModelCapabilities]]


class RequestValidator:
    """Validates requests against `limits` and each model's rules and reported limits."""

    def __init__(self, limits: RequestLimits) -> None:
        self._limits = limits
        # What each model's replicas reported: the same for the model's whole life.
        self._capabilities: dict[str, ModelCapabilities] = {}

    async def reported(
        self, model_id: str, capabilities_of: CapabilitiesOf, timeout_s: float
    ) -> ModelCapabilities | None:
        """What the model's replicas reported, asking them if not yet known, or None if none
        answers within `timeout_s` (a model still starting, or scaled to zero)."""
        if model_id not in self._capabilities:
            try:
                reported = await asyncio.wait_for(capabilities_of(), timeout_s)
            except Exception:  # starting, unreachable, or slower than a listing may wait
                return None
            self._capabilities[model_id] = reported
        return self._capabilities[model_id]

    async def generation(
        self, body: object, model: ModelConfig, capabilities: CapabilitiesOf, deadline: Deadline
    ) -> tuple[ImageGenerationRequest, ValidationContext]:
        """A generation's JSON body, taken strictly as OpenAI's API takes it (`"2"` and
        `true` are no numbers)."""
        params, context = await self._validated(
            ImageGenerationRequest, body, model, capabilities, deadline, strict=True
        )
        check_openai_fields(params)
        check_supported(params, context.capabilities, model, "text-to-image")
        return params, context

    async def edit(
        self,
        fields: object,
        task: Task,
        model: ModelConfig,
        capabilities: CapabilitiesOf,
        deadline: Deadline,
        images: int = 1,
    ) -> tuple[ImageEditRequest, ValidationContext]:
        """An edit's form fields (text, so converted) and how many images it sends, before
        any upload is decoded."""
        params, context = await self._validated(
            ImageEditRequest, fields, model, capabilities, deadline, strict=False
        )
        check_openai_fields(params)
        check_supported(params, context.capabilities, model, task)
        check_input_images(images, context.capabilities, model, task)
        check_edit_steps(params, context.capabilities, model, task)
        return params, context

    async def _validated(
        self,
        schema: type[Request],
        fields: object,
        model: ModelConfig,
        capabilities_of: CapabilitiesOf,
        deadline: Deadline,
        *,
        strict: bool,
    ) -> tuple[Request, ValidationContext]:
        """The fields against the schema, the config's limits and the model's own, which its
        replicas report once (asked within the request's time: one may still be starting)."""
        capabilities = self._capabilities.get(model.id)
        if capabilities is None:
            config_only = ValidationContext(limits=self._limits, model=model)
            _validate(schema, fields, config_only, strict=strict)
            capabilities = await deadline.wait(capabilities_of())
            self._capabilities[model.id] = capabilities
        context = ValidationContext(limits=self._limits, model=model, capabilities=capabilities)
        return _validate(schema, fields, context, strict=strict), context


def _validate(
    schema: type[Request], fields: object, context: ValidationContext, *, strict: bool
) -> Request:
    try:
        params = schema.model_validate(fields, context=context, strict=strict)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    if (option := params.streaming_option_without_stream()) is not None:
        raise invalid_request(
            f"Invalid value for '{option}': it needs 'stream': true.",
            param=option,
            code="invalid_value",
        )
    return params
