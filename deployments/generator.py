"""The generator deployment: a replica that loads ONE pipeline at start and keeps it.

It does the model's work only: it receives `GenerationJob`s from the ingress, runs them on
per-request pipeline views in its worker threads (see `deployments/engine.py`) and returns
raw pixels. Resources (`num_gpus`), replica counts and queue limits come from the Serve
config's `deployments:` entry named `ImageGenerator`; the defaults below suit image work,
where one request holds the device for seconds (Serve's own defaults assume milliseconds).
"""

from __future__ import annotations

from ray import serve

from deployments.config import BatchingConfig, ModelConfig
from deployments.engine import ImageEngine
from deployments.jobs import GeneratedImages, GenerationJob
from deployments.pipelines import load_pipeline

GENERATOR_DEPLOYMENT = "ImageGenerator"


@serve.deployment(
    name=GENERATOR_DEPLOYMENT,
    # Requests a replica takes at once: the running batches plus those forming inside it
    # (at least worker_threads x max_batch_images, so batches can fill).
    max_ongoing_requests=24,
    # Requests waiting for a replica before new ones get 503 (Serve's default is no limit).
    max_queued_requests=64,
    # Let in-flight generations finish on redeploy or scale-down.
    graceful_shutdown_timeout_s=300,
    graceful_shutdown_wait_loop_s=2,
    health_check_period_s=10,
    health_check_timeout_s=30,
    ray_actor_options={"num_cpus": 1, "num_gpus": 0},
)
class ImageGenerator:
    def __init__(self, model: ModelConfig, worker_threads: int, batching: BatchingConfig) -> None:
        self._engine = ImageEngine(
            load_pipeline(model),
            worker_threads,
            max_batch_images=batching.max_batch_images,
            max_batch_pixels=batching.max_batch_pixels,
            max_wait_s=batching.max_wait_ms / 1000,
        )

    async def generate(self, job: GenerationJob) -> GeneratedImages:
        return await self._engine.generate(job)

    def check_health(self) -> None:
        self._engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
