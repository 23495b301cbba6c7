"""Deadlines on the real embedded SD3, on both of a replica's paths (the continuous loop and
request-level batches): a job that cannot finish in time is refused before any of its steps
runs, on arrival or when it would start after waiting; the others run as they would have.

The replica's rate is set by the test (`ServiceRate.recent`), so what is refused does not
depend on this machine's speed."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.generator.engine import ImageEngine
from deployments.generator.model.pipelines import load_pipeline
from deployments.jobs import DeadlineUnreachable, GenerationJob
from deployments.scheduling.job_schedule import JobSchedule
from tests.jobs import make_job

# One image a step or a call, one thread: one job runs at a time, the others wait.
ONE_AT_A_TIME = BatchingConfig(max_batch_images=1, max_wait_ms=0)
# Steps x pixels of a 32x32 image's step.
STEP_WORK = 32 * 32


@pytest.fixture(scope="module")
def sd3():
    return load_pipeline(ModelConfig(device="cpu"))


@pytest.fixture(params=[True, False], ids=["loop", "calls"])
def engine(request, sd3) -> ImageEngine:
    batching = ONE_AT_A_TIME.model_copy(update={"continuous": request.param})
    engine = ImageEngine(sd3, worker_threads=1, batching=batching, continuous=request.param)
    assert engine.continuous == request.param
    return engine


def job(seed: int, steps: int, timeout_s: float | None = None) -> GenerationJob:
    now = time.time()
    schedule = JobSchedule(
        arrived=now,
        deadline=now + timeout_s if timeout_s is not None else float("inf"),
        refuse_late=True,
    )
    return make_job(
        seed,
        width=32,
        height=32,
        num_inference_steps=steps,
        schedule=schedule,
        request_id=str(seed),
    )


def set_rate(engine: ImageEngine, steps_per_s: float | None) -> None:
    """The replica's recent rate, in 32x32 steps per second."""
    rate = None if steps_per_s is None else steps_per_s * STEP_WORK
    engine.work.rate.recent = lambda: rate


def test_a_job_that_cannot_finish_in_time_is_refused_on_arrival(engine):
    set_rate(engine, 10.0)  # 10 steps a second
    before = engine.steps_run
    with pytest.raises(DeadlineUnreachable) as refused:
        asyncio.run(engine.generate(job(1, steps=40, timeout_s=2.0)))  # 4 s of work
    assert refused.value.retry_after_s in (2, 3)  # 2 s late, and the time the call took
    assert engine.steps_run == before
    # In time at that rate, or with no rate measured yet: it runs.
    assert asyncio.run(engine.generate(job(2, steps=4, timeout_s=2.0))).seeds == (2,)
    set_rate(engine, None)
    assert asyncio.run(engine.generate(job(3, steps=40, timeout_s=2.0))).seeds == (3,)


def test_a_waiting_job_that_can_no_longer_finish_fails_instead_of_starting(engine):
    async def scenario():
        set_rate(engine, None)  # nothing refused on arrival
        blocker = asyncio.ensure_future(engine.generate(job(1, steps=30)))
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(engine.generate(job(2, steps=20, timeout_s=60)))
        kept = asyncio.ensure_future(engine.generate(job(3, steps=20)))
        await asyncio.sleep(0.05)
        # Now the replica runs a step every 5 s: job 2's 20 steps take 100 s, past its 60.
        set_rate(engine, 0.2)
        return await asyncio.gather(blocker, doomed, kept, return_exceptions=True)

    before = engine.steps_run
    blocker, doomed, kept = asyncio.run(scenario())
    assert isinstance(doomed, DeadlineUnreachable)
    assert blocker.seeds == (1,) and kept.seeds == (3,)  # kept has no deadline
    assert engine.steps_run - before == 30 + 20  # none of job 2's steps ran


def classed(seed: int, rank: int, steps: int, waited_s: float = 0.0) -> GenerationJob:
    schedule = JobSchedule(
        priority_class=("high", "low")[rank], rank=rank, arrived=time.time() - waited_s, aging_s=10
    )
    return make_job(seed, width=32, height=32, num_inference_steps=steps, schedule=schedule)


def preempting_engine(sd3, preempt: bool, lanes: int = 2) -> ImageEngine:
    batching = BatchingConfig(
        max_batch_images=8, max_wait_ms=0, continuous=True, preempt_lower_classes=preempt
    )
    return ImageEngine(sd3, worker_threads=lanes, batching=batching, continuous=True)


def low_then_high(engine: ImageEngine, lows: list[GenerationJob], high: GenerationJob):
    async def scenario():
        running = [asyncio.ensure_future(engine.generate(low)) for low in lows]
        await asyncio.sleep(0.1)  # the low jobs are in both lanes' loops
        return await asyncio.gather(engine.generate(high), *running)

    return asyncio.run(scenario())


@pytest.mark.parametrize("preempt", [True, False], ids=["preempting", "sharing"])
def test_with_preemption_a_high_class_job_steps_alone_past_low_ones_and_all_equal_alone(
    sd3, preempt
):
    engine = preempting_engine(sd3, preempt)
    lows = [classed(seed, 1, steps=40) for seed in (1, 2, 3, 4)]
    high = classed(9, 0, steps=8)
    results = low_then_high(engine, lows, high)
    # Its largest step: itself alone, or beside the low images of its lane.
    assert (results[0].batch_images == 1) == preempt
    assert all(low.batch_images >= 2 for low in results[1:])  # they went on together
    for job_, result in zip([high, *lows], results, strict=True):
        (alone,) = asyncio.run(engine.generate(job_)).images
        difference = np.abs(result.images[0].astype(np.int16) - alone.astype(np.int16))
        assert difference.max() <= 1 and (difference > 0).mean() <= 0.001


def test_a_low_class_job_that_aged_to_the_top_steps_beside_the_high_one(sd3):
    engine = preempting_engine(sd3, preempt=True, lanes=1)  # one lane: they meet in it
    aged = classed(1, 1, steps=40, waited_s=15)  # one class up after 10 s
    high, _ = low_then_high(engine, [aged], classed(9, 0, steps=8))
    assert high.batch_images == 2


def test_classes_that_aged_to_the_top_together_still_step_within_one_budget(sd3):
    batching = BatchingConfig(
        max_batch_images=2, max_wait_ms=0, continuous=True, preempt_lower_classes=True
    )
    engine = ImageEngine(sd3, worker_threads=1, batching=batching, continuous=True)

    def classed_job(seed: int, rank: int) -> GenerationJob:
        schedule = JobSchedule(rank=rank, arrived=time.time(), aging_s=0.3)
        return make_job(seed, width=32, height=32, num_inference_steps=80, schedule=schedule)

    async def scenario():
        # Low, then normal, then high: each joins beside the others (only its class and
        # higher count against its budget), three images in a group of budget 2; within
        # 0.6 s all have aged to the top.
        running = []
        for seed, rank in ((1, 2), (2, 1), (3, 0)):
            running.append(asyncio.ensure_future(engine.generate(classed_job(seed, rank))))
            await asyncio.sleep(0.05)
        return await asyncio.gather(*running)

    results = asyncio.run(scenario())
    assert max(result.batch_images for result in results) == 2
