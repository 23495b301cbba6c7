"""Caches decided per image in the continuous loop (`optimizations.cache` with
`batching.continuous`, `deployments/generator/loop/caches/`): each image keeps its own cache
state and decides at its own step: First-Block-Cache whether the blocks past the first run
for it, TaylorSeer whether its hooked modules run or predict. Different jobs at once (1 or 2
images, 3 to 8 steps, guided or not, joining at different steps) each give the images the
same job makes alone on the request-level path with diffusers' own cache; the cached
modules run fewer rows than enter the denoiser (images skip); an image does not depend on
what shares its forwards; with LoRA adapters on some jobs, the same. First-Block-Cache on
FLUX (the loop's family whose blocks diffusers' cache knows: it refuses SD3's and Chroma's at
the start), TaylorSeer on FLUX and on SD3 (two rows an image with guidance).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.engine.loop_cache import CASES as BENCH_CASES
from bench.engine.loop_cache import CachedRows
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
# Settings that skip on the embedded models' random weights at 8 steps (as in test_cache.py):
# the benchmark's (`bench.engine.loop_cache`).
CACHES = {case.split("/")[1]: cache for case, cache in BENCH_CASES.items()}
CASES = [("tiny-flux", "first_block"), ("tiny-flux", "taylorseer"), ("tiny-sd3", "taylorseer")]
ADAPTERS = {"tiny-flux": "embedded:tiny-flux/ink", "tiny-sd3": "embedded:tiny-sd3/ink"}


def config(family: str, kind: str = "first_block", **optimizations) -> ModelConfig:
    return ModelConfig(
        id=family,
        source=f"embedded:{family}",
        device="cpu",
        default_size="32x32",
        default_steps=8,
        optimizations={"cache": CACHES[kind], **optimizations},
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


def cached_pipeline(family: str, kind: str):
    model = config(family, kind)
    pipeline = load_pipeline(model)
    apply_cache(pipeline, model)
    return pipeline


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def case(request):
    return request.param


@pytest.fixture(scope="module")
def cached(case):
    return cached_pipeline(*case)


async def _all_at_once(engine: ImageEngine, jobs: list[GenerationJob]) -> list[list[np.ndarray]]:
    """The jobs sent a step apart or so, so that they join the loop at different steps."""

    async def sent(index: int, job: GenerationJob) -> list[np.ndarray]:
        await asyncio.sleep(0.03 * index)
        return (await engine.generate(job)).images

    return await asyncio.gather(*(sent(index, job) for index, job in enumerate(jobs)))


def in_the_loop(pipeline, jobs: list[GenerationJob], workers: int = 2, adapters=None):
    """The jobs sent to a loop engine on `pipeline` about a step apart; their images, and
    the images of each of the loop's steps."""
    engine = ImageEngine(pipeline, workers, batching=LOOP, continuous=True, adapters=adapters)
    try:
        return asyncio.run(_all_at_once(engine, jobs)), engine.batch_sizes
    finally:
        engine.shutdown()


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


def test_per_image_caches_run_the_loop_other_caches_and_compile_keep_request_level():
    assert runs_continuous(config("tiny-flux", "first_block"), LOOP)
    assert runs_continuous(config("tiny-sd3", "taylorseer"), LOOP)
    assert not runs_continuous(config("tiny-flux", compile=True), LOOP)
    magcache = ModelConfig(optimizations={"cache": CacheConfig(kind="magcache")})
    assert not runs_continuous(magcache, LOOP)


def test_different_jobs_at_once_each_give_their_images_alone_and_images_skip(cached):
    """Fails when the loop runs every row through the cached modules (nothing skips), and
    when images share one decision (an image's output then depends on its forward's
    companions)."""
    pipeline = cached
    counted = CachedRows(denoiser_of(pipeline))
    try:
        together, steps = in_the_loop(pipeline, JOBS)
    finally:
        counted.remove()
    assert counted.through < counted.entered, "no image skipped the cached modules"
    assert max(steps) > 1, "the jobs never shared a forward"
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


def test_images_with_and_without_an_adapter_skip_on_their_own_rows(case):
    """The cached modules run on the computing rows with those rows' adapters (the LoRA
    routing narrowed with them)."""
    ink = [AdapterConfig(id="ink", source=ADAPTERS[case[0]])]
    jobs = [
        replace(sent, adapters=(("ink", 1.0),)) if i % 2 else sent for i, sent in enumerate(JOBS)
    ]
    # Pipelines of their own: adapters stay loaded in a pipeline's modules.
    shared, reference = cached_pipeline(*case), cached_pipeline(*case)
    together, _ = in_the_loop(shared, jobs, adapters=AdapterStore(shared, ink, 2))
    assert_same_images(together, alone(reference, jobs, AdapterStore(reference, ink, 2)))


def test_a_forward_that_fails_midway_runs_again_from_the_images_states_before_it(cached):
    """Out of memory in the last layer of the denoiser's last block, in each forward where
    it runs more than two rows: after First-Block-Cache's first block decided and replaced
    the images' residuals but before the last one stored theirs, after TaylorSeer's modules
    counted the step. The step runs again in halves, down to one image, from the states as
    they were: each image still equals its request alone. Fails when a failed forward's
    changes are kept (the halves then see a step already counted, or a residual of a step
    that never finished)."""
    pipeline = cached
    blocks = [
        module
        for name, module in denoiser_of(pipeline).named_modules()
        if name.count(".") == 1 and name.split(".")[0].endswith("transformer_blocks")
    ]
    last = [m for m in blocks[-1].modules() if isinstance(m, torch.nn.Linear)][-1]
    failed = []

    def out_of_memory(_module, args):
        if args[0].shape[0] > 2:  # more rows than one image has
            failed.append(args[0].shape[0])
            raise torch.OutOfMemoryError("out of memory (a test's)")

    hook = last.register_forward_pre_hook(out_of_memory)
    try:
        together, _ = in_the_loop(pipeline, JOBS, workers=1)
    finally:
        hook.remove()
    assert failed, "no forward ran out of memory"
    assert_same_images(together, alone(pipeline, JOBS))


def test_request_level_calls_beside_the_loop_keep_their_own_cache_state(cached, case):
    """A job of more images than a loop step holds runs request-level (diffusers' hooks,
    their state per call) in one thread while the loop's forwards run per-image states in
    another: each image equals its request alone. TaylorSeer only: First-Block-Cache decides
    once for a request-level batch, so its images are not each request's alone."""
    if case[1] != "taylorseer":
        pytest.skip("a request-level batch shares First-Block-Cache's decision")
    pipeline = cached
    large = job(60, steps=7, guidance=4.5, n=LOOP.max_batch_images + 1)
    together, _ = in_the_loop(pipeline, [large, *JOBS])
    assert_same_images(together, alone(pipeline, [large, *JOBS]))
