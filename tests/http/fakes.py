"""A fake generator for the in-process HTTP tier: pixels made from the seed, no model."""

from __future__ import annotations

import numpy as np

from deployments.jobs import GeneratedImages, GenerationJob


def pixels_for(seed: int, width: int, height: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


class FakeGenerator:
    """Records the jobs it receives; raises `fail_with` instead of generating when set."""

    def __init__(self) -> None:
        self.jobs: list[GenerationJob] = []
        self.fail_with: BaseException | None = None

    async def generate(self, job: GenerationJob) -> GeneratedImages:
        self.jobs.append(job)
        if self.fail_with is not None:
            raise self.fail_with
        images = [pixels_for(seed, job.width, job.height) for seed in job.seeds]
        return GeneratedImages(images=images, seeds=job.seeds)
