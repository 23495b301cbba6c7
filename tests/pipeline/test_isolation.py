"""No job hurts another, on the real embedded pipeline: a bad job fails alone in its batch,
a job too large for one call runs in chunks, and running out of memory splits a call."""

from __future__ import annotations

import asyncio
import functools

import numpy as np
import pytest
import torch

from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.generator.engine import ImageEngine
from deployments.generator.model.pipelines import load_pipeline
from deployments.jobs import (
    GeneratedImages,
    GenerationJob,
    GenerationOutOfMemory,
    PartialImage,
    StepProgress,
)
from tests.jobs import make_job

# A lone UTF-16 surrogate: the tokenizer rejects the prompt (TypeError), failing its call.
POISONED_PROMPT = "a lighthouse \ud800"


def job(seed: int, *, prompt: str = "", n: int = 1, partial_images: int = 0) -> GenerationJob:
    return make_job(
        seed,
        n=n,
        prompt=prompt or f"a lighthouse, take {seed}",
        request_id=f"request-{seed}",
        partial_images=partial_images,
    )


def assert_nearly_equal(a: np.ndarray, b: np.ndarray) -> None:
    """Equal but for float noise of another batch size (design note 8): at most 1 level of
    255, in at most 0.1% of the values."""
    difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert difference.max() <= 1
    assert (difference > 0).mean() <= 0.001


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline(ModelConfig(device="cpu", dtype="float32"))


@pytest.fixture
def calls(pipeline, monkeypatch) -> list[int]:
    """The images of each pipeline call from now on (failed calls included)."""
    sizes: list[int] = []
    original = type(pipeline).__call__

    # Wrapped, so that the engine still reads the call's parameters from its signature.
    @functools.wraps(original)
    def counted(self, *args, **kwargs):
        sizes.append(len(kwargs["prompt"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipeline), "__call__", counted)
    return sizes


def out_of_memory_above(pipeline, monkeypatch, images: int) -> None:
    """The transformer runs out of memory on more than `images` images (as a GPU would)."""
    forward = pipeline.transformer.forward

    def limited(hidden_states, *args, **kwargs):
        # Classifier-free guidance runs each image twice: unconditioned and conditioned.
        if hidden_states.shape[0] > 2 * images:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(hidden_states, *args, **kwargs)

    monkeypatch.setattr(pipeline.transformer, "forward", limited)


def alone(pipeline, jobs: list[GenerationJob]) -> list[GeneratedImages]:
    """Each job in a call of its own, one after another."""
    engine = ImageEngine(pipeline, worker_threads=1)
    try:
        return [asyncio.run(engine.generate(j)) for j in jobs]
    finally:
        engine.shutdown()


def batched(engine: ImageEngine, jobs: list, return_exceptions: bool = True) -> list:
    """`jobs` (jobs, or coroutines) submitted together while a blocker holds the only worker
    thread, so that they batch, in this order; their results or exceptions."""

    async def scenario():
        blocker = asyncio.create_task(engine.generate(job(999)))
        await asyncio.sleep(0)  # the blocker takes the thread; the rest queue up
        tasks = [j if asyncio.iscoroutine(j) else engine.generate(j) for j in jobs]
        results = await asyncio.gather(*tasks, return_exceptions=return_exceptions)
        await blocker
        return results

    return asyncio.run(scenario())


def batching_engine(pipeline, **settings) -> ImageEngine:
    return ImageEngine(
        pipeline,
        worker_threads=1,
        batching=BatchingConfig(**{"max_batch_images": 8, "max_wait_ms": 200, **settings}),
    )


def test_a_bad_prompt_fails_alone_and_its_neighbours_get_their_own_images(pipeline, calls, caplog):
    good = [job(seed) for seed in range(1, 8)]
    expected = alone(pipeline, good)
    poisoned = job(100, prompt=POISONED_PROMPT)
    engine = batching_engine(pipeline)
    calls.clear()
    try:
        with caplog.at_level("WARNING", logger="ray.serve"):
            results = batched(engine, [*good[:3], poisoned, *good[3:]])
    finally:
        engine.shutdown()
    # The blocker, the batch of 8 (failed), then each of its jobs alone.
    assert calls == [1, 8, 1, 1, 1, 1, 1, 1, 1, 1], calls
    assert isinstance(results[3], TypeError)  # the tokenizer's own exception
    neighbours = results[:3] + results[4:]
    for sent, want, got in zip(good, expected, neighbours, strict=True):
        assert isinstance(got, GeneratedImages), got
        assert got.seeds == sent.seeds and got.batch_images == 1
        assert_nearly_equal(want.images[0], got.images[0])
    assert "request-100" in caplog.text and "request-1" in caplog.text
    assert "TypeError" in caplog.text
    engine.check_health()  # one bad prompt is not a broken replica


def test_a_streamed_job_run_again_still_streams_and_is_timed(pipeline):
    streamed = job(7, n=2, partial_images=1)
    (expected,) = alone(pipeline, [streamed])
    engine = batching_engine(pipeline)

    async def collect() -> list:
        return [event async for event in engine.stream(streamed)]

    try:
        events, failed = batched(engine, [collect(), job(100, prompt=POISONED_PROMPT)])
    finally:
        engine.shutdown()
    assert isinstance(failed, TypeError)
    final = events[-1]
    assert isinstance(final, GeneratedImages) and final.batch_images == 2
    for want, got in zip(expected.images, final.images, strict=True):
        assert_nearly_equal(want, got)
    # The failed call stopped in its prompt encoding, before any step: progress and
    # previews come from the call that ran again.
    assert [e.image_index for e in events if isinstance(e, PartialImage)] == [0, 1]
    assert [e for e in events if isinstance(e, StepProgress)][-1] == StepProgress(2, 2)
    assert final.denoise_s > 0 and final.text_encode_s > 0 and final.decode_s > 0
    assert final.generate_s >= final.denoise_s + final.decode_s


def test_a_job_too_large_for_one_call_runs_in_chunks_of_its_seeds(pipeline, calls):
    large = job(500, n=10, partial_images=1)
    (expected,) = alone(pipeline, [large])  # the default budget: one call of 10
    engine = ImageEngine(
        pipeline,
        worker_threads=1,
        batching=BatchingConfig(max_batch_images=8, max_batch_pixels=3 * 64 * 64),
    )
    calls.clear()

    async def collect() -> list:
        return [event async for event in engine.stream(large)]

    try:
        events = asyncio.run(collect())
    finally:
        engine.shutdown()
    assert calls == [3, 3, 3, 1]
    result = events[-1]
    assert result.seeds == large.seeds and result.batch_images == 3
    for want, got in zip(expected.images, result.images, strict=True):
        assert_nearly_equal(want, got)
    # Each chunk previews its own images, numbered within the job; its progress starts over.
    assert [e.image_index for e in events if isinstance(e, PartialImage)] == list(range(10))
    assert [e for e in events if isinstance(e, StepProgress)].count(StepProgress(2, 2)) == 4


def test_out_of_memory_splits_the_batch_down_to_what_fits(pipeline, calls, monkeypatch):
    jobs = [job(10, n=3), job(20), job(30, n=2)]
    expected = alone(pipeline, jobs)
    engine = batching_engine(pipeline)
    out_of_memory_above(pipeline, monkeypatch, images=2)
    calls.clear()
    try:
        results = batched(engine, jobs, return_exceptions=False)
    finally:
        engine.shutdown()
    # The blocker; the batch of 6 runs out; each job alone; the job of 3 runs out: 2 + 1.
    assert calls == [1, 6, 3, 2, 1, 1, 2], calls
    for want, got in zip(expected, results, strict=True):
        assert got.seeds == want.seeds
        for a, b in zip(want.images, got.images, strict=True):
            assert_nearly_equal(a, b)
    engine.check_health()


def test_a_single_image_out_of_memory_fails_its_job_but_not_the_replica(
    pipeline, calls, monkeypatch
):
    engine = ImageEngine(pipeline, worker_threads=1)
    try:
        with monkeypatch.context() as patch:
            out_of_memory_above(pipeline, patch, images=0)
            with pytest.raises(GenerationOutOfMemory, match="64x64"):
                asyncio.run(engine.generate(job(1, n=2)))
        # The first half ran out alone; the rest of the job never ran.
        assert calls == [2, 1], calls
        engine.check_health()
        assert len(asyncio.run(engine.generate(job(1, n=2))).images) == 2
    finally:
        engine.shutdown()
