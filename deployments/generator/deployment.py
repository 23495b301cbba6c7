"""The generator deployment: a replica that loads ONE pipeline at start and keeps it.

It does the model's work only: it receives `GenerationJob`s from the ingress, runs them on
per-request pipeline views in its worker threads (see `engine.py`, its front) and
returns raw pixels. Each served model has its own deployment of this class, named
`ImageGenerator:<model id>`, so each scales on its own. Resources (`num_gpus`), replica counts
and queue limits come from the model's `deployment:` options in `args`; the defaults below
suit image work, where one request holds the device for seconds (Serve's own defaults assume
milliseconds).

LoRA adapters ride on Ray Serve's model multiplexing: the ingress sends a job with adapters
with `multiplexed_model_id=adapter_set_id(job.adapters)`, so Serve routes it to a replica that
already holds that set. The replica's multiplexed loader (wired in the constructor, so that
its limit is the model's `max_adapters_per_replica`) prefetches the set's adapters in a
thread, off the event loop, while generations go on; the engine loads them into the shared
pipeline between calls (`deployments/generator/adapters/adapter_store.py`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import torch
from ray import serve
from ray.serve.context import _get_internal_replica_context

from deployments.adapter_directory import WatchedAdapterDirectory
from deployments.autoscaling_policy import JOBS_METRIC, WORK_METRIC
from deployments.config.model_config import GENERATOR_DEPLOYMENT, BatchingConfig, ModelConfig
from deployments.generator.adapters.adapter_store import AdapterStore
from deployments.generator.calls.warmup import compiled_graphs, prepare_to_serve
from deployments.generator.engine import ImageEngine
from deployments.generator.loop.caches import PER_IMAGE_KINDS
from deployments.generator.model.cache_hooks import apply_cache
from deployments.generator.model.components import denoiser_of
from deployments.generator.model.model_limits import check_default_size
from deployments.generator.model.pipelines import load_pipeline, resolve_device
from deployments.generator.model.torch_threads import cpu_threads_per_call, run_in_pool, worker_pool
from deployments.generator.parallel.rank_group import RankGroup
from deployments.generator.safety.image_checker import load_image_checker
from deployments.generator.safety.safety_gate import SafetyGate
from deployments.jobs import (
    GeneratedImages,
    GenerationEvent,
    GenerationJob,
    ModelCapabilities,
    adapter_set_id,
)
from deployments.metrics import GeneratorMetrics


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
        # Every torch op of this replica runs in the pool's threads, the start's too: torch
        # work in this thread would cost each call an OpenMP team more (torch_threads.py).
        pool = worker_pool(worker_threads)
        try:
            self._engine = run_in_pool(
                pool, lambda: start_engine(model, worker_threads, batching, pool)
            )
        except BaseException:
            pool.shutdown()  # a failed start leaves no thread behind (it is idle now)
            raise
        check_default_size(model, self._engine.capabilities())
        self._load_adapter_set = self._adapter_set_loader(model)

    def _adapter_set_loader(self, model: ModelConfig) -> Callable[[str], Awaitable[str]] | None:
        """The multiplexed loader of adapter sets (`"ink+paper"`): it prefetches them in a
        thread. Serve keeps `max_adapters_per_replica` sets per replica, least recently used
        out, and routes each set's requests to the replicas that hold it. Outside a Serve
        replica (tests), the same loader without Serve's cache and routing."""
        store = self._engine.adapters
        if store is None:
            return None

        async def load_adapter_set(set_id: str) -> str:
            await asyncio.to_thread(store.prefetch, set_id.split("+"))
            return set_id  # what Serve keeps: the set is staged in the store

        if _get_internal_replica_context() is None:
            return load_adapter_set
        # Wrapped here rather than decorated: the decorator's limit would be fixed for
        # every model. Serve finds a wrapper stored on the instance (Ray >= 2.50).
        return serve.multiplexed(max_num_models_per_replica=model.max_adapters_per_replica)(
            load_adapter_set
        )

    async def _prepare_adapters(self, job: GenerationJob) -> None:
        """Tell Serve this replica holds the job's adapter set (its multiplexed loader
        stages the set); the engine stages whatever the store still lacks."""
        if job.adapters and self._load_adapter_set is not None:
            await self._load_adapter_set(adapter_set_id(job.adapters))

    async def generate(self, job: GenerationJob) -> GeneratedImages:
        await self._prepare_adapters(job)
        return await self._engine.generate(job)

    async def generate_stream(self, job: GenerationJob) -> AsyncIterator[GenerationEvent]:
        """Progress and previews while the job runs, then its images (a streaming call)."""
        await self._prepare_adapters(job)
        async for event in self._engine.stream(job):
            yield event

    def capabilities(self) -> ModelCapabilities:
        """What the loaded pipeline can do, for the ingress to check requests against."""
        return self._engine.capabilities()

    def check_health(self) -> None:
        self._engine.check_health()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What the cost-aware autoscaling policy scales on: the steps x pixels the
        replica's jobs still have to run, and how many jobs it holds
        (`deployments/autoscaling_policy.py`). Serve calls it on an autoscaled
        deployment only, every `min(look_back_period_s / 5, metrics_interval_s)` seconds, and
        sends the figures to its controller every `metrics_interval_s`."""
        held = self._engine.work.held()
        return {WORK_METRIC: held.step_pixels, JOBS_METRIC: float(held.jobs)}

    def counters(self) -> dict[str, Any]:
        """What the replica has done so far, for operators, tests and the benchmark."""
        on_cuda = self._engine.device.type == "cuda"
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "steps_run": self._engine.steps_run,
            # Images in each of its most recent pipeline calls, oldest first: how it batched.
            "batch_sizes": self._engine.batch_sizes[-100:],
            # Rows the continuous loop's forwards ran, and of them padding (a compiled
            # denoiser's steps run at warmed row counts: `loop/row_buckets.py`).
            "loop_rows": self._engine.loop_rows,
            # Most bytes of GPU memory its tensors held at once (since the start or the last
            # `reset_peak_memory`); None off CUDA.
            "cuda_peak_allocated_bytes": (
                torch.cuda.max_memory_allocated(self._engine.device) if on_cuda else None
            ),
            # Graphs torch.compile made in this process: constant once warmed up, unless
            # requests come at shapes the warm-up did not run.
            "compiled_graphs": compiled_graphs(),
            # LoRA adapters in the pipeline now (least recently used first), loads so far,
            # and switches between adapter sets; None for a model without adapters.
            "adapters": self._adapter_counters(),
            # The processes of a parallel replica's ranks 1..N-1 (`models[].parallel`).
            "rank_pids": self._engine.rank_pids,
        }

    def _adapter_counters(self) -> dict[str, list[str] | int | list[float]] | None:
        store = self._engine.adapters
        if store is None:
            return None
        return {
            "loaded": store.loaded,
            "loads": store.loads,
            "load_seconds": store.load_seconds[-20:],
            "switches": store.gate.switches,
        }

    def reset_peak_memory(self) -> None:
        """Start a new peak for `counters()["cuda_peak_allocated_bytes"]`."""
        if self._engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._engine.device)

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def adapter_store(pipeline, model: ModelConfig, metrics: GeneratorMetrics) -> AdapterStore | None:
    """The replica's adapters: those of the config, and those its watched directory holds."""
    if not model.adapters and model.adapter_directory is None:
        return None
    directory = None
    if model.adapter_directory is not None:
        taken = {model.id} | {adapter.id for adapter in model.adapters}
        directory = WatchedAdapterDirectory(model.adapter_directory, taken)
    return AdapterStore(
        pipeline, model.adapters, model.max_adapters_per_replica, metrics, directory=directory
    )


def start_engine(
    model: ModelConfig, worker_threads: int, batching: BatchingConfig, pool: ThreadPoolExecutor
) -> ImageEngine:
    """The model's engine on `pool`, its pipeline loaded, its cache applied, compiled and
    warmed up; run in one of the pool's threads (see `__init__`). Serve sends the replica
    requests only once its constructor returns, so every configured shape runs now
    (`prepare_to_serve`)."""
    if resolve_device(model.device).type == "cpu":
        torch.set_num_threads(cpu_threads_per_call(worker_threads))
    ranks = None
    if model.parallel is not None:  # the other ranks load the model while this one does
        ranks = RankGroup.launch(model, torch.get_num_threads())
    try:
        pipeline = load_pipeline(model)
        apply_cache(pipeline, model)  # optimizations.cache; fails the start if unsupported
        if ranks is not None:  # before the warm-up: its forwards run on every rank
            ranks.join(denoiser_of(pipeline))
    except BaseException:
        if ranks is not None:
            ranks.stop()
        raise
    continuous = runs_continuous(model, batching)
    prepare_to_serve(pipeline, model, batching, continuous=continuous)
    metrics = GeneratorMetrics(model.id)
    return ImageEngine(
        pipeline,
        worker_threads,
        batching=batching,
        metrics=metrics,
        adapters=adapter_store(pipeline, model, metrics),
        pool=pool,
        continuous=continuous,
        safety=safety_gate(model, pipeline.device),
        ranks=ranks,
        compiled=model.optimizations.compile_config is not None,
    )


def safety_gate(model: ModelConfig, device: torch.device) -> SafetyGate | None:
    """The model's image checker (`models[].safety`), loaded on the pipeline's device."""
    if model.safety is None:
        return None
    return SafetyGate(load_image_checker(model.safety, device), model.safety)


def runs_continuous(model: ModelConfig, batching: BatchingConfig) -> bool:
    """Whether the model's text-to-image jobs run in the continuous loop: asked for, and
    either uncached or with a cache decided per image in the loop (First-Block-Cache,
    TaylorSeer: `loop/caches/`) and not compiled (the rows a cached step computes change every
    step, which a compiled denoiser would recompile for). The other caches keep their state
    per pipeline call, so a model with one keeps request-level batches. A compiled one runs
    the loop with its rows padded to the counts its start warms (`loop/row_buckets.py`)."""
    cache = model.optimizations.cache
    if cache is None:
        return batching.continuous
    compiled = model.optimizations.compile_config is not None
    return batching.continuous and cache.kind in PER_IMAGE_KINDS and not compiled
