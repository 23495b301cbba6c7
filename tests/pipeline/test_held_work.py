"""The work a replica reports to the cost-aware autoscaling policy, on the real embedded
pipeline: every held job's remaining steps x pixels, waiting or running."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.generator.engine import UNBATCHED, ImageEngine
from deployments.generator.model.pipelines import load_pipeline
from deployments.generator.progress import previews
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


def held_after_each_step(engine: ImageEngine, pool: ThreadPoolExecutor, job: GenerationJob):
    """The held work at each streamed step of `job`, and before any step ran."""
    seen: list[tuple[int, HeldWork]] = []

    def sink(event: GenerationEvent) -> None:
        if isinstance(event, StepProgress):
            seen.append((event.step, engine.work.held()))

    async def scenario() -> HeldWork:
        gate = threading.Event()
        pool.submit(gate.wait)  # the only worker is busy until the job is held
        running = asyncio.ensure_future(engine.generate(job, sink))
        while engine.work.held().jobs < 1:
            await asyncio.sleep(0.001)
        before = engine.work.held()
        gate.set()
        await running
        return before

    try:
        before = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert engine.work.held() == HeldWork(step_pixels=0, jobs=0)  # answered: gone
    return before, seen


@pytest.fixture
def every_step_streamed(monkeypatch):
    """Progress after every step (streams are otherwise throttled to a few a second)."""
    monkeypatch.setattr(previews, "PROGRESS_INTERVAL_S", 0.0)


def test_held_work_goes_down_step_by_step_in_the_continuous_loop(pipeline, every_step_streamed):
    """The loop counts as the request-level calls do: a running job less one step of its
    images' pixels after each of the loop's steps."""
    pool = ThreadPoolExecutor(1)
    loop = BatchingConfig(max_batch_images=8, max_wait_ms=0, continuous=True)
    engine = ImageEngine(pipeline, worker_threads=1, batching=loop, pool=pool, continuous=True)
    assert engine.continuous
    before, seen = held_after_each_step(engine, pool, job(64, steps=4, n=2))
    per_step = 64 * 64 * 2
    assert before == HeldWork(step_pixels=4 * per_step, jobs=1)
    assert seen == [
        (step, HeldWork(step_pixels=(4 - step) * per_step, jobs=1)) for step in (1, 2, 3, 4)
    ]


def test_held_work_of_a_job_split_into_several_calls_goes_down_with_each_calls_steps(
    pipeline, every_step_streamed
):
    """n=3 at a pixel budget of one image a call: three calls of 4 steps, each taking its one
    image's pixels off the job's work per step, down to 0 after the twelfth."""
    pool = ThreadPoolExecutor(1)
    one_image = BatchingConfig(max_batch_images=1, max_batch_pixels=64 * 64, max_wait_ms=0)
    engine = ImageEngine(pipeline, worker_threads=1, batching=one_image, pool=pool)
    before, seen = held_after_each_step(engine, pool, job(64, steps=4, n=3))
    per_image_step = 64 * 64
    assert before == HeldWork(step_pixels=3 * 4 * per_image_step, jobs=1)
    remaining = [held.step_pixels for _, held in seen]
    assert remaining == [(12 - done) * per_image_step for done in range(1, 13)]
