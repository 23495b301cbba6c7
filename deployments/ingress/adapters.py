"""Which LoRA adapters a request applies: its `model` (a model, or an adapter of one) and
its `lora` list, checked against the adapters the config gives each model.

A request names an adapter in one of two ways, as OpenAI-style servers do: `model:
"<adapter id>"` (the adapter on its base model, at its configured scale), or `lora: [{name,
scale}]` on the base model (several composed). Both may be combined. The result is the job's
`adapters`: sorted by id, with zero scales left out, so that equal requests make equal jobs
(and share batches) and a scale of 0 is exactly the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from deployments.ingress.errors import APIError, invalid_request
from deployments.ingress.protocol import LoraReference
from deployments.jobs import AdapterWeight
from deployments.model_config import AdapterConfig, ModelConfig


@dataclass(frozen=True)
class AdapterCatalog:
    """Every configured adapter, by id, with the model it belongs to."""

    adapters: dict[str, tuple[ModelConfig, AdapterConfig]]

    @classmethod
    def of(cls, models: Sequence[ModelConfig]) -> AdapterCatalog:
        return cls({adapter.id: (model, adapter) for model in models for adapter in model.adapters})

    def find(self, adapter_id: str) -> tuple[ModelConfig, AdapterConfig] | None:
        return self.adapters.get(adapter_id)

    def resolve(
        self,
        model: ModelConfig,
        chosen: AdapterConfig | None,
        lora: Sequence[LoraReference] | None,
    ) -> tuple[AdapterWeight, ...]:
        """The adapters of a request on `model`: `chosen` (named by its `model`) and those
        of its `lora` list (already checked for count and scale range by the schema)."""
        scales: dict[str, float] = {}
        if chosen is not None:
            scales[chosen.id] = chosen.scale
        for index, reference in enumerate(lora or ()):
            param = f"lora.{index}.name"
            found = self.find(reference.name)
            if found is None:
                raise adapter_not_found(reference.name, param)
            owner, adapter = found
            if owner.id != model.id:
                raise invalid_request(
                    f"Invalid value for '{param}': adapter '{adapter.id}' belongs to model "
                    f"'{owner.id}', not '{model.id}'.",
                    param=param,
                    code="invalid_value",
                )
            if adapter.id in scales:
                raise invalid_request(
                    f"Invalid value for '{param}': adapter '{adapter.id}' is given twice.",
                    param=param,
                    code="invalid_value",
                )
            scales[adapter.id] = reference.scale if reference.scale is not None else adapter.scale
        if len(scales) > model.max_adapters_per_request:
            raise invalid_request(
                f"Invalid value for 'lora': {len(scales)} adapters in all; model "
                f"'{model.id}' composes at most {model.max_adapters_per_request}.",
                param="lora",
                code="invalid_value",
            )
        return tuple(sorted((name, scale) for name, scale in scales.items() if scale != 0))


def adapter_not_found(adapter_id: str, param: str) -> APIError:
    return APIError(
        404,
        f"The adapter '{adapter_id}' does not exist.",
        type="invalid_request_error",
        param=param,
        code="model_not_found",
    )


def describe_adapters(adapters: tuple[AdapterWeight, ...]) -> str | None:
    """A job's adapters for its log line: `ink:1+paper:0.5`, or None."""
    if not adapters:
        return None
    return "+".join(f"{name}:{scale:g}" for name, scale in adapters)
