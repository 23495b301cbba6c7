"""First-Block-Cache in the continuous loop (`optimizations.cache.kind: first_block` with
`batching.continuous`, `deployments/generator/loop/per_image_cache.py`): each image decides at
its own step, on its own residuals, whether the blocks past the first run for it. Different
jobs at once (1 or 2 images, 3 to 8 steps, guided or not, joining at different steps) each
give the images the same job makes alone on the request-level path with diffusers' own
cache; the blocks past the first run fewer rows than the first (images skip); and an image
does not depend on what shares its forwards. On FLUX (the loop's family whose blocks diffusers'
cache knows: it refuses SD3's and Chroma's at the start), with and without LoRA adapters.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import torch

from deployments.config.model_config import AdapterConfig, BatchingConfig, ModelConfig
from deployments.config.optimizations_config import CacheConfig
from deployments.generator.adapters.adapter_store import AdapterStore
from deployments.generator.deployment import runs_continuous
from deployments.generator.engine import ImageEngine
from deployments.generator.model.cache_hooks import apply_cache
from deployments.generator.model.components import denoiser_of
from deployments.generator.model.pipelines import load_pipeline
from deployments.jobs import GenerationJob
from tests.jobs import make_job

LOOP = BatchingConfig(max_batch_images=4, max_wait_ms=0, continuous=True)
ALONE = BatchingConfig(max_batch_images=1, max_wait_ms=0)
# Skips on the embedded models' random weights at 8 steps (as in test_cache.py).
CACHE = CacheConfig(kind="first_block", threshold=0.5)


def config(family: str, **optimizations) -> ModelConfig:
    return ModelConfig(
        id=family,
        source=f"embedded:{family}",
        device="cpu",
        default_size="32x32",
        default_steps=8,
        optimizations={"cache": CACHE, **optimizations},
    )


def job(seed: int, steps: int, guidance: float, n: int = 1) -> GenerationJob:
    return make_job(
        seed,
        n=n,
        width=32,
        height=32,
        prompt="a lighthouse on a cliff",
        num_inference_steps=steps,
        guidance_scale=guidance,
        request_id=f"request-{seed}",
    )


# Images of one prompt by seed: a two-image job's second image is its seed + 1's alone.
JOBS = [
    job(0, steps=8, guidance=4.5),
    job(10, steps=5, guidance=1.0, n=2),
    job(20, steps=8, guidance=3.0),
    job(30, steps=3, guidance=4.5),
    job(40, steps=6, guidance=7.0),
]


def cached_pipeline():
    model = config("tiny-flux")
    pipeline = load_pipeline(model)
    apply_cache(pipeline, model)
    return pipeline


@pytest.fixture(scope="module")
def cached():
    return cached_pipeline()


class RowsThroughBlocks:
    """The rows each forward runs through the denoiser's first and last transformer block
    (counted at a layer inside each, which sees the rows the block really runs)."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        blocks = [
            module
            for name, module in denoiser.named_modules()
            if name.count(".") == 1 and name.split(".")[0].endswith("transformer_blocks")
        ]
        self.first: list[int] = []
        self.last: list[int] = []
        self._hooks = [
            self._first_linear(blocks[0]).register_forward_pre_hook(self._count(self.first)),
            self._first_linear(blocks[-1]).register_forward_pre_hook(self._count(self.last)),
        ]

    @staticmethod
    def _first_linear(block: torch.nn.Module) -> torch.nn.Module:
        return next(m for m in block.modules() if isinstance(m, torch.nn.Linear))

    @staticmethod
    def _count(into: list[int]):
        return lambda _module, args: into.append(args[0].shape[0])

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


async def _all_at_once(engine: ImageEngine, jobs: list[GenerationJob]) -> list[list[np.ndarray]]:
    """The jobs sent a step apart or so, so that they join the loop at different steps."""

    async def sent(index: int, job: GenerationJob) -> list[np.ndarray]:
        await asyncio.sleep(0.03 * index)
        return (await engine.generate(job)).images

    return await asyncio.gather(*(sent(index, job) for index, job in enumerate(jobs)))


def alone(pipeline, jobs: list[GenerationJob], adapters=None) -> list[list[np.ndarray]]:
    """Each image by a request of its own on the request-level path (diffusers' cache)."""
    engine = ImageEngine(pipeline, 1, batching=ALONE, adapters=adapters)

    def one(sent: GenerationJob, seed: int) -> np.ndarray:
        request = replace(sent, seeds=(seed,), request_id=f"alone-{seed}")
        return asyncio.run(engine.generate(request)).images[0]

    try:
        return [[one(sent, seed) for seed in sent.seeds] for sent in jobs]
    finally:
        engine.shutdown()


def assert_same_images(got: list[list[np.ndarray]], expected: list[list[np.ndarray]]) -> None:
    for images, alone_images in zip(got, expected, strict=True):
        for image, reference in zip(images, alone_images, strict=True):
            difference = np.abs(image.astype(np.int16) - reference.astype(np.int16))
            assert difference.max() <= 1 and (difference > 0).mean() <= 0.001


def test_first_block_cache_runs_the_loop_other_caches_and_compile_keep_request_level():
    assert runs_continuous(config("tiny-flux"), LOOP)
    assert not runs_continuous(config("tiny-flux", compile=True), LOOP)
    taylor = ModelConfig(optimizations={"cache": CacheConfig(kind="taylorseer")})
    assert not runs_continuous(taylor, LOOP)


def test_different_jobs_at_once_each_give_their_images_alone_and_images_skip(cached):
    """Fails when the loop runs every block for every row (nothing skips), and when images
    share one decision (an image's output then depends on its forward's companions)."""
    pipeline = cached
    counted = RowsThroughBlocks(denoiser_of(pipeline))
    engine = ImageEngine(pipeline, 2, batching=LOOP, continuous=True)
    try:
        together = asyncio.run(_all_at_once(engine, JOBS))
    finally:
        engine.shutdown()
        counted.remove()
    assert sum(counted.last) < sum(counted.first), "no image skipped the blocks past the first"
    assert max(counted.first) > 1, "the jobs never shared a forward"
    assert_same_images(together, alone(pipeline, JOBS))


def test_an_image_does_not_depend_on_what_shares_its_forwards(cached):
    """The same jobs in another order and spacing give the same images."""
    pipeline = cached
    engine = ImageEngine(pipeline, 1, batching=LOOP, continuous=True)
    try:
        first = asyncio.run(_all_at_once(engine, JOBS))
        second = asyncio.run(_all_at_once(engine, JOBS[::-1]))[::-1]
    finally:
        engine.shutdown()
    assert_same_images(first, second)


def test_images_with_and_without_an_adapter_skip_on_their_own_rows(cached):
    """The blocks past the first run on the computing rows with those rows' adapters (the
    LoRA routing narrowed with them)."""
    ink = [AdapterConfig(id="ink", source="embedded:tiny-flux/ink")]
    jobs = [
        replace(sent, adapters=(("ink", 1.0),)) if i % 2 else sent for i, sent in enumerate(JOBS)
    ]
    # Pipelines of their own: adapters stay loaded in a pipeline's modules.
    shared, reference = cached_pipeline(), cached_pipeline()
    engine = ImageEngine(
        shared, 2, batching=LOOP, continuous=True, adapters=AdapterStore(shared, ink, 2)
    )
    try:
        together = asyncio.run(_all_at_once(engine, jobs))
    finally:
        engine.shutdown()
    assert_same_images(together, alone(reference, jobs, AdapterStore(reference, ink, 2)))
