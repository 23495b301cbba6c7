"""Which LoRA adapters a request applies: its `model` (a model, or an adapter of one) and
its `lora` list, checked against the adapters the config gives each model.

A request names an adapter in one of two ways, as OpenAI-style servers do: `model:
"<adapter id>"` (the adapter on its base model, at its configured scale), or `lora: [{name,
scale}]` on the base model (several composed). Both may be combined. The result is the job's
`adapters`: sorted by id, scales rounded to two decimals, zero scales left out, so that equal
requests make equal jobs (and share batches) and a scale of 0 is exactly the base model.
"""

from __future__ import annotations

from collections.abc import Sequence

from deployments.adapter_directory import WatchedAdapterDirectory
from deployments.config.model_config import AdapterConfig, ModelConfig
from deployments.ingress.errors import APIError, invalid_request
from deployments.ingress.protocol import LoraReference
from deployments.jobs import AdapterWeight


class AdapterCatalog:
    """Every adapter, by id, with the model it belongs to: those of the config, and those
    found in the models' watched `adapter_directory` (read again every few seconds)."""

    def __init__(self, models: Sequence[ModelConfig]) -> None:
        self._configured = {
            adapter.id: (model, adapter) for model in models for adapter in model.adapters
        }
        taken = {model.id for model in models} | set(self._configured)
        self._watched = [
            (model, WatchedAdapterDirectory(model.adapter_directory, taken))
            for model in models
            if model.adapter_directory is not None
        ]

    @property
    def watches_directories(self) -> bool:
        return bool(self._watched)

    def all(self) -> dict[str, tuple[ModelConfig, AdapterConfig]]:
        """The adapters now (a directory's first model wins an id two directories hold)."""
        found = dict(self._configured)
        for model, directory in self._watched:
            for adapter_id, adapter in directory.adapters().items():
                found.setdefault(adapter_id, (model, adapter))
        return found

    def find(self, adapter_id: str) -> tuple[ModelConfig, AdapterConfig] | None:
        """Without reading the directories (as last read: see `all`)."""
        if adapter_id in self._configured:
            return self._configured[adapter_id]
        for model, directory in self._watched:
            if (adapter := directory.last_read().get(adapter_id)) is not None:
                return model, adapter
        return None

    def resolve(
        self,
        model: ModelConfig,
        chosen: AdapterConfig | None,
        lora: Sequence[LoraReference] | None,
    ) -> tuple[AdapterWeight, ...]:
        """The adapters of a request on `model`: `chosen` (named by its `model`) and those
        of its `lora` list, checked against the model's adapters and limits."""
        scales: dict[str, float] = {}
        if chosen is not None:
            scales[chosen.id] = round(chosen.scale, 2)
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
            if reference.scale is not None and not (
                model.min_adapter_scale <= reference.scale <= model.max_adapter_scale
            ):
                raise invalid_request(
                    f"Invalid value for 'lora.{index}.scale': must be between "
                    f"{model.min_adapter_scale:g} and {model.max_adapter_scale:g}.",
                    param=f"lora.{index}.scale",
                    code="invalid_value",
                )
            scale = reference.scale if reference.scale is not None else adapter.scale
            # Two decimals: scales a hair apart would each be a set of their own, never
            # batched together and each a switch of the replica's modules.
            scales[adapter.id] = round(scale, 2)
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
