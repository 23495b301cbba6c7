"""A fake generator for the in-process HTTP tier: pixels made from the seed, no model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from deployments.jobs import (
    GeneratedImages,
    GenerationEvent,
    GenerationJob,
    ModelCapabilities,
    PartialImage,
    StepProgress,
    preview_steps,
)

# What SD3's pipelines take: every task, every optional parameter.
EVERYTHING = ModelCapabilities(
    pipeline_class="FakePipeline",
    tasks={
        "text-to-image": frozenset({"negative_prompt", "guidance_scale"}),
        "image-to-image": frozenset(
            {"negative_prompt", "guidance_scale", "strength", "input_fidelity"}
        ),
        "inpaint": frozenset(
            {"negative_prompt", "guidance_scale", "strength", "input_fidelity", "mask"}
        ),
    },
)


# What the fake replica says of where a job's time went (a real one measures it).
REPLICA_TIMINGS = {
    "batch_images": 3,
    "queue_s": 0.25,
    "text_encode_s": 0.5,
    "denoise_s": 1.5,
    "decode_s": 0.125,
}


def fake_text_tokens(job: GenerationJob) -> int:
    """What the fake replica says the prompts' tokens are (a real one uses the tokenizer):
    one per word."""
    return len(job.prompt.split()) + len((job.negative_prompt or "").split())


def pixels_for(seed: int, width: int, height: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


class FakeGenerator:
    """Records the jobs it receives; raises `fail_with` instead of generating when set.

    With `delay_s` it takes that long, and records in `cancelled` the jobs whose caller
    stopped waiting (what a real replica's engine would stop generating). Streamed, it sends
    progress after every step and previews where a real engine would, `delay_s` spread over
    the steps.
    """

    def __init__(self, capabilities: ModelCapabilities = EVERYTHING) -> None:
        self.model_capabilities = capabilities
        self.jobs: list[GenerationJob] = []
        self.cancelled: list[GenerationJob] = []
        self.fail_with: BaseException | None = None
        self.delay_s = 0.0

    async def capabilities(self) -> ModelCapabilities:
        return self.model_capabilities

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
        return GeneratedImages(
            images=images, seeds=job.seeds, text_tokens=fake_text_tokens(job), **REPLICA_TIMINGS
        )

    async def stream(self, job: GenerationJob) -> AsyncIterator[GenerationEvent]:
        self.jobs.append(job)
        if self.fail_with is not None:
            raise self.fail_with
        steps = job.num_inference_steps
        try:
            for step in range(1, steps + 1):
                await asyncio.sleep(self.delay_s / steps)
                if step in preview_steps(job.partial_images, steps):
                    index = preview_steps(job.partial_images, steps).index(step)
                    for image_index, seed in enumerate(job.seeds):
                        small = pixels_for(seed, job.width // 8, job.height // 8)
                        yield PartialImage(image_index, index, small)
                yield StepProgress(step=step, total_steps=steps)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(job)
            raise
        images = [pixels_for(seed, job.width, job.height) for seed in job.seeds]
        yield GeneratedImages(images=images, seeds=job.seeds, text_tokens=fake_text_tokens(job))
