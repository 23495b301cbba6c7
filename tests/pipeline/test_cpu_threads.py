"""The engine on the real embedded pipeline sets torch's threads per call: a request alone
runs on every core it was given, one that starts beside a running call on its share."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from deployments.generator.engine import ImageEngine
from deployments.generator.pipelines import load_pipeline
from deployments.jobs import GenerationJob
from deployments.model_config import ModelConfig


def job(seed: int, steps: int = 2, side: int = 64) -> GenerationJob:
    return GenerationJob(
        prompt="a lighthouse",
        negative_prompt=None,
        width=side,
        height=side,
        num_inference_steps=steps,
        guidance_scale=7.0,
        seeds=(seed,),
    )


@pytest.fixture
def seen_threads(monkeypatch):
    """The pipeline, and (worker thread, torch's thread count) at each denoiser forward."""
    pipeline = load_pipeline(ModelConfig(device="cpu", dtype="float32"))
    seen: list[tuple[int, int]] = []
    forward = pipeline.transformer.forward

    def recording_forward(*args, **kwargs):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipeline.transformer, "forward", recording_forward)
    before = torch.get_num_threads()
    yield pipeline, seen
    torch.set_num_threads(before)


def test_a_lone_request_uses_every_core(seen_threads):
    pipeline, seen = seen_threads
    torch.set_num_threads(1)  # as a replica of two worker threads on 2 cores starts
    engine = ImageEngine(pipeline, worker_threads=2, cpu_cores=2)
    try:
        asyncio.run(engine.generate(job(0)))
    finally:
        engine.shutdown()
    assert seen and {threads for _, threads in seen} == {2}


def test_a_call_starting_beside_another_gets_its_share(seen_threads):
    pipeline, seen = seen_threads
    engine = ImageEngine(pipeline, worker_threads=2, cpu_cores=2)

    async def overlap():
        first = asyncio.create_task(engine.generate(job(0, steps=30, side=128)))
        while engine.steps_run < 1:
            await asyncio.sleep(0.005)
        (first_thread, alone), *_ = seen
        await engine.generate(job(1, steps=2))
        await first
        return first_thread, alone

    try:
        first_thread, alone = asyncio.run(overlap())
    finally:
        engine.shutdown()
    assert alone == 2
    beside = {threads for thread, threads in seen if thread != first_thread}
    assert beside == {1}
