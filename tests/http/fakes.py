"""A fake generator for the in-process HTTP tier: pixels made from the seed, no model."""

from __future__ import annotations

import asyncio

import numpy as np

from deployments.jobs import GeneratedImages, GenerationJob


def pixels_for(seed: int, width: int, height: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


class FakeGenerator:
    """Records the jobs it receives; raises `fail_with` instead of generating when set.

    With `delay_s` it takes that long, and records in `cancelled` the jobs whose caller
    stopped waiting (what a real replica's engine would stop generating).
    """

    def __init__(self) -> None:
        self.jobs: list[GenerationJob] = []
        self.cancelled: list[GenerationJob] = []
        self.fail_with: BaseException | None = None
        self.delay_s = 0.0

    async def generate(self, job: GenerationJob) -> GeneratedImages:
        self.jobs.append(job)
        if self.fail_with is not None:
            raise self.fail_with
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.append(job)
            raise
        images = [pixels_for(seed, job.width, job.height) for seed in job.seeds]
        return GeneratedImages(images=images, seeds=job.seeds)
