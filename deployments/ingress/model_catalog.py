"""The models a request may name: each served model, and each LoRA adapter of one (listed
as a model of its own, its base model as `parent`, vLLM's convention). `GET /v1/models` lists
them, and a request's `model` is looked up here."""

from __future__ import annotations

import time
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from deployments.config.app_config import AppArgs
from deployments.config.model_config import AdapterConfig, ModelConfig
from deployments.ingress.adapter_catalog import AdapterCatalog
from deployments.ingress.errors import model_not_found
from deployments.ingress.protocol import Model, ModelList


@dataclass(frozen=True)
class Target:
    """What a request's `model` names: a model, and the adapter of it if it named one."""

    model: ModelConfig
    adapter: AdapterConfig | None = None


class ModelCatalog:
    """The application's models and their adapters, by id."""

    def __init__(self, args: AppArgs) -> None:
        self._args = args
        self._models = args.model_by_id()
        self.adapters = AdapterCatalog(args.models)
        self._started = int(time.time())
        self._model_cards = {
            model.id: Model(id=model.id, created=self._started, owned_by=model.owned_by)
            for model in args.models
        }

    async def list_models(self) -> ModelList:
        adapters = await self._read_adapter_directories()
        cards = list(self._model_cards.values())
        cards += [self._adapter_card(model, adapter) for model, adapter in adapters.values()]
        return ModelList(data=cards)

    async def get_model(self, model_id: str) -> Model:
        if model_id in self._model_cards:
            return self._model_cards[model_id]
        await self._read_adapter_directories()
        if (found := self.adapters.find(model_id)) is not None:
            return self._adapter_card(*found)
        raise model_not_found(model_id)

    async def target_of(self, requested: object) -> Target:
        """The model (or adapter of a model) a request names, or the default model; 404 for
        an unknown name. (A name that is not a string is left to the request's validation,
        against the default.)"""
        if requested is None or not isinstance(requested, str):
            return Target(self._models[self._args.default_model_id])
        if requested in self._models:
            return Target(self._models[requested])
        await self._read_adapter_directories()
        if (found := self.adapters.find(requested)) is not None:
            return Target(*found)
        raise model_not_found(requested)

    async def _read_adapter_directories(self) -> dict[str, tuple[ModelConfig, AdapterConfig]]:
        """Every adapter, the watched directories brought up to date (at most every few
        seconds) in a thread: on a network volume a listing may take a while."""
        if self.adapters.watches_directories:
            return await run_in_threadpool(self.adapters.all)
        return self.adapters.all()

    def _adapter_card(self, model: ModelConfig, adapter: AdapterConfig) -> Model:
        return Model(id=adapter.id, created=self._started, owned_by=model.owned_by, parent=model.id)
