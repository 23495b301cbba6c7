"""The work a replica reports to the cost-aware autoscaling policy, on the real embedded
pipeline: every held job's remaining steps x pixels, waiting or running."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from deployments.config.model_config import ModelConfig
from deployments.generator.engine import UNBATCHED, ImageEngine
from deployments.generator.model.pipelines import load_pipeline
from deployments.generator.progress.work_meter import HeldWork
from deployments.jobs import GenerationEvent, GenerationJob, StepProgress
from tests.jobs import make_job


def job(width: int, steps: int, n: int) -> GenerationJob:
    return make_job(n=n, width=width, height=width, num_inference_steps=steps)


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline(ModelConfig(device="cpu", dtype="float32"))


def test_held_work_counts_waiting_jobs_whole_and_running_ones_less_their_steps(pipeline):
    pool = ThreadPoolExecutor(1)
    engine = ImageEngine(pipeline, worker_threads=1, batching=UNBATCHED, pool=pool)
    running = job(64, steps=4, n=2)  # 64 x 64 x 2 images x 4 steps = 32768
    waiting = job(32, steps=2, n=1)  # 2048
    seen: list[tuple[int, HeldWork]] = []

    def sink(event: GenerationEvent) -> None:
        # Called in the worker thread inside the step's callback, after the step counted.
        if isinstance(event, StepProgress):
            seen.append((event.step, engine.work.held()))

    async def scenario() -> HeldWork:
        # The only worker is busy until both jobs are in: the first waits for it, the
        # second behind the first.
        gate = threading.Event()
        pool.submit(gate.wait)
        first = asyncio.ensure_future(engine.generate(running, sink))
        second = asyncio.ensure_future(engine.generate(waiting))
        for _ in range(10):  # each task runs up to its wait for its batch, in a loop turn
            await asyncio.sleep(0)
        before = engine.work.held()
        gate.set()
        await asyncio.gather(first, second)
        return before

    try:
        before = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert before == HeldWork(step_pixels=32768 + 2048, jobs=2)
    per_step = 64 * 64 * 2
    assert seen[0] == (1, HeldWork(step_pixels=32768 - per_step + 2048, jobs=2))
    assert seen[-1] == (4, HeldWork(step_pixels=2048, jobs=2))  # done, not yet answered
    assert engine.work.held() == HeldWork(step_pixels=0, jobs=0)
