"""The real HTTP app in-process over REAL engines on the embedded pipelines: what the fuzz
and property tests of this tier send goes all the way into diffusers, so a 500 that only the
model can cause (a size its positional embedding cannot take, a prompt its tokenizer
rejects) shows up here, not only against fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from fastapi.testclient import TestClient

from deployments.config.app_config import AppArgs
from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.generator.adapters.adapter_store import AdapterStore
from deployments.generator.deployment import safety_gate
from deployments.generator.engine import ImageEngine
from deployments.generator.model.pipelines import load_pipeline
from deployments.ingress.app import create_api
from deployments.ingress.deployment import generator_errors_as_api_errors
from deployments.jobs import GeneratedImages, GenerationEvent, GenerationJob, ModelCapabilities


class EngineBackend:
    """An `ImageBackend` over an engine in this process, with the same error translation as
    the ingress's client of a generator deployment."""

    def __init__(self, engine: ImageEngine) -> None:
        self.engine = engine
        self.calls = 0  # generations and streams asked of the engine: what passed validation

    async def capabilities(self) -> ModelCapabilities:
        return self.engine.capabilities()

    async def generate(self, job: GenerationJob) -> GeneratedImages:
        self.calls += 1
        with generator_errors_as_api_errors(job.request_id):
            return await self.engine.generate(job)

    async def stream(self, job: GenerationJob) -> AsyncIterator[GenerationEvent]:
        self.calls += 1
        with generator_errors_as_api_errors(job.request_id):
            async for event in self.engine.stream(job):
                yield event


@contextmanager
def engine_client(
    args: AppArgs, batching: BatchingConfig
) -> Iterator[tuple[TestClient, dict[str, EngineBackend]]]:
    """A client of the app over one real engine per model of `args` (one event loop for the
    client's whole life, as a replica has), and the app's backends by model id (their
    `calls` say which requests reached a model)."""
    engines = {model.id: _engine(model, batching) for model in args.models}
    backends = {model_id: EngineBackend(engine) for model_id, engine in engines.items()}
    app = create_api(args, backends)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, backends
    finally:
        for engine in engines.values():
            engine.shutdown()


def _engine(model: ModelConfig, batching: BatchingConfig) -> ImageEngine:
    pipeline = load_pipeline(model)
    adapters = None
    if model.adapters:
        adapters = AdapterStore(pipeline, model.adapters, model.max_adapters_per_replica)
    return ImageEngine(
        pipeline,
        worker_threads=2,
        batching=batching,
        adapters=adapters,
        continuous=batching.continuous,
        safety=safety_gate(model, pipeline.device),  # as the replica makes it
    )
