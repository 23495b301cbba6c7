"""Which lane of the continuous loop a job joins: the one with the least work left (steps x
pixels still to run), not the one holding the fewest images, so that a short job is not put
in the lane whose turns a long, large one slows.

The lanes here never run (their pool holds its tasks): the test sees only the choice.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor, Future

from deployments.config.model_config import BatchingConfig
from deployments.generator.loop.continuous_batching import ContinuousBatching
from deployments.generator.loop.loop_jobs import LaneHooks
from deployments.generator.progress.work_meter import WorkMeter
from tests.jobs import make_job


class HeldPool(Executor):
    """An executor that never runs what it is given (a lane stays queued)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return Future()


def engine(work: WorkMeter) -> ContinuousBatching:
    hooks = LaneHooks(
        capacity=lambda width, height: 8,
        step_done=lambda jobs, images: None,
        job_done=lambda job, result: None,
        broken=lambda error: False,
        others_waiting=lambda: False,
    )
    batching = BatchingConfig(max_batch_images=8, continuous=True)
    return ContinuousBatching(None, HeldPool(), 2, batching, hooks, work, None, None)


def lane_of(loop: ContinuousBatching, request_id: str) -> int:
    for index, lane in enumerate(loop._lanes):
        if any(queued.job.request_id == request_id for queued in lane.held()):
            return index
    raise AssertionError(f"{request_id} is in no lane")


def test_a_short_job_joins_the_lane_without_the_long_one_whatever_their_images():
    async def submit_three() -> ContinuousBatching:
        loop = engine(WorkMeter())
        jobs = {
            "long": make_job(1, width=128, height=128, num_inference_steps=20, request_id="long"),
            "short": make_job(2, n=2, num_inference_steps=4, request_id="short"),
            "next": make_job(3, num_inference_steps=4, request_id="next"),
        }
        tasks = []
        for job in jobs.values():
            tasks.append(asyncio.create_task(loop.submit(job)))
            await asyncio.sleep(0)  # each is in its lane before the next comes
        choice = loop
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return choice

    loop = asyncio.run(submit_three())
    # "long" holds 1 image and "short" 2: by images, "next" would join the long one.
    assert lane_of(loop, "long") != lane_of(loop, "short")
    assert lane_of(loop, "next") == lane_of(loop, "short")
