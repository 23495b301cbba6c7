"""`models[].optimizations`: what the schema refuses, and which shapes a compiled replica
warms up before it is ready."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.config.optimizations_config import CompileConfig, OptimizationsConfig
from deployments.generator.calls.warmup import warmup_shapes


@pytest.mark.parametrize(
    "options",
    [
        {"compile": {"mode": "fastest"}},
        {"compile": {"warmup_sizes": ["64"]}},
        {"compile": {"warmup_batch_sizes": [0]}},
        {"attention_backend": "flash2"},
        {"quantization": "int4"},
        {"vae_tilling": True},
    ],
)
def test_unknown_options_are_refused(options):
    with pytest.raises(ValidationError):
        OptimizationsConfig.model_validate(options)


def test_compile_true_is_the_default_compile_config():
    assert OptimizationsConfig(compile=True).compile_config == CompileConfig()
    assert OptimizationsConfig().compile_config is None


def shapes(default_size: str, batching: BatchingConfig, **compile_options) -> list[tuple]:
    model = ModelConfig(default_size=default_size)
    found = warmup_shapes(model, batching, CompileConfig(**compile_options))
    return [(s.width, s.height, s.images) for s in found]


def test_by_default_the_default_size_alone_and_in_the_largest_batch():
    batching = BatchingConfig(max_batch_images=8, max_batch_pixels=8 * 256 * 256)
    assert shapes("64x64", batching) == [(64, 64, 1), (64, 64, 8)]
    # The largest call batching makes at 512x512 holds 2 images; at 1024x1024, one.
    assert shapes("512x512", batching) == [(512, 512, 1), (512, 512, 2)]
    assert shapes("1024x1024", batching) == [(1024, 1024, 1)]
    assert shapes("64x64", BatchingConfig(max_batch_images=1)) == [(64, 64, 1)]


def test_configured_sizes_and_batches_are_each_warmed():
    batching = BatchingConfig()
    found = shapes("64x64", batching, warmup_sizes=["32x48", "64x64"], warmup_batch_sizes=[2])
    assert found == [(32, 48, 2), (64, 64, 2)]
    found = shapes("64x64", BatchingConfig(max_batch_images=4), warmup_sizes=["128x64"])
    assert found == [(128, 64, 1), (128, 64, 4)]


def test_the_replica_starts_in_its_worker_thread_and_warms_up_before_it_is_ready(monkeypatch):
    """Serve marks a replica ready, and routes requests to it, once its constructor returns:
    the warm-up must run inside it, before the engine exists. And every torch op of the start
    runs in the engine's worker thread, where the calls will run: torch work in a thread of
    its own would cost each call on a CPU an OpenMP team more (torch_threads.py)."""
    from deployments.generator import deployment

    calls = []

    def record(step: str, value: object) -> object:
        calls.append((step, threading.current_thread().name))
        return value

    pipeline = SimpleNamespace(device=torch.device("meta"))
    engine = SimpleNamespace(capabilities=lambda: None, adapters=None, device=pipeline.device)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    monkeypatch.setattr(deployment, "load_pipeline", lambda model: record("load", pipeline))
    monkeypatch.setattr(
        deployment, "prepare_to_serve", lambda p, model, batching, **_: record("warm-up", p)
    )
    monkeypatch.setattr(deployment, "ImageEngine", lambda p, *a, **k: record("engine", engine))
    monkeypatch.setattr(deployment, "GeneratorMetrics", lambda model_id: None)
    monkeypatch.setattr(deployment, "check_default_size", lambda model, capabilities: None)
    model = ModelConfig(optimizations={"compile": True})
    deployment.ImageGenerator.func_or_class(model, 1, BatchingConfig())
    assert [step for step, _ in calls] == ["load", "warm-up", "engine"]
    assert all(thread.startswith("generate") for _, thread in calls), calls


INK = {"id": "ink", "source": "embedded:tiny-sd3/ink"}


@pytest.mark.parametrize("quantization", ["int8_weight_only", "int8_dynamic"])
def test_adapters_take_int8_quantization(quantization):
    model = ModelConfig(adapters=[INK], optimizations={"quantization": quantization})
    assert model.optimizations.quantization == quantization


@pytest.mark.parametrize(
    ("optimizations", "refusal"),
    [({"quantization": "float8_weight_only"}, "float8"), ({"compile": True}, "compile")],
)
def test_adapters_refuse_what_is_not_checked_with_them(optimizations, refusal):
    with pytest.raises(ValidationError, match=refusal):
        ModelConfig(adapters=[INK], optimizations=optimizations)
