"""The continuous loop on a compiled denoiser (`optimizations.compile` with
`batching.continuous`, `deployments/generator/loop/row_buckets.py`): the replica's start
compiles a forward at every row count the loop pads a step to; under traffic of different
jobs at once (guided and not, 1 to 3 images, 2 to 5 steps, joining at different steps) every
forward runs at one of those counts, nothing compiles, and each image is the one the same
job makes alone on the request-level path of the same compiled pipeline. On SD3 (guidance
by doubled rows) and FLUX (guidance an input: a row an image).

The compile backend is dynamo's `eager` (the graphs torch.compile makes, run without
generated code), as in `test_optimizations.py`: the graphs and their guards are inductor's,
in a fraction of the time.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.config.optimizations_config import CompileConfig
from deployments.generator.calls.warmup import compiled_graphs, prepare_to_serve
from deployments.generator.engine import ImageEngine
from deployments.generator.loop.families import family_of
from deployments.generator.loop.row_buckets import row_buckets, warm_up
from deployments.generator.model.pipelines import RequestPipelines, load_pipeline
from deployments.jobs import GenerationJob
from tests.jobs import make_job

# 4 images a step: an SD3 forward holds 1 to 8 rows, padded to 1, 2, 4 or 8; FLUX's 1 to 4.
LOOP = BatchingConfig(max_batch_images=4, max_wait_ms=0, continuous=True)
BUCKETS = {"tiny-sd3": [1, 2, 4, 8], "tiny-flux": [1, 2, 4]}


def config(family: str) -> ModelConfig:
    return ModelConfig(
        id=family,
        source=f"embedded:{family}",
        device="cpu",
        default_size="32x32",
        optimizations={"compile": CompileConfig(warmup_sizes=["32x32"])},
    )


def job(seed: int, n: int, steps: int, guidance: float) -> GenerationJob:
    return make_job(
        seed,
        n=n,
        width=32,
        height=32,
        prompt=f"a lighthouse, take {seed}",
        num_inference_steps=steps,
        guidance_scale=guidance,
        request_id=f"request-{seed}",
    )


# Different jobs: with guidance (two rows an image) and without (one), of 1 to 3 images.
# Two run alone before the others come: one row, and three (padded to four whatever the
# timing of the others, which on a busy machine can happen to fill buckets exactly).
LONE = [job(50, n=1, steps=2, guidance=1.0), job(60, n=3, steps=2, guidance=1.0)]
JOBS = [
    job(0, n=1, steps=5, guidance=4.5),
    job(10, n=2, steps=3, guidance=1.0),
    job(20, n=1, steps=4, guidance=1.0),
    job(30, n=3, steps=2, guidance=4.5),
    job(40, n=1, steps=3, guidance=7.0),
]


@pytest.fixture(scope="module", params=list(BUCKETS))
def compiled(request):
    """The family's blocks compiled, its start's warm-up run with the loop's, from a clean
    dynamo state (earlier compilations in this process would shape its graphs)."""
    torch._dynamo.reset()
    model = config(request.param)
    pipeline = load_pipeline(model)
    warmup = prepare_to_serve(pipeline, model, LOOP, compile_backend="eager", continuous=True)
    yield pipeline, warmup, BUCKETS[request.param]
    torch._dynamo.reset()


def test_row_buckets_are_powers_of_two_up_to_the_most_rows_a_step_holds():
    assert row_buckets(8) == [1, 2, 4, 8, 16]
    assert row_buckets(3) == [1, 2, 4, 6]
    assert row_buckets(1) == [1, 2]
    assert row_buckets(8, rows_per_image=1) == [1, 2, 4, 8]


def test_a_warm_up_count_out_of_memory_ends_the_size_s_warm_up_not_the_start(compiled):
    """The larger counts would run in halves under traffic (the loop's out-of-memory split)."""
    pipeline, _, _ = compiled
    family = family_of(RequestPipelines(pipeline).view())
    forward = family.forward

    def forward_up_to_two_rows(images):
        if len(family.rows(images)) > 2:
            raise torch.OutOfMemoryError("out of memory (a test's)")
        return forward(images)

    family.forward = forward_up_to_two_rows
    assert warm_up(family, 32, 32, LOOP.max_batch_images, 4.5) == [1, 2]
    family.forward = lambda images: 1 / 0
    with pytest.raises(ZeroDivisionError):  # any other failure still fails the start
        warm_up(family, 32, 32, LOOP.max_batch_images, 4.5)


def test_the_start_runs_the_loop_at_every_row_count_it_pads_to(compiled):
    _, warmup, buckets = compiled
    assert warmup.loop_shapes == [(32, 32, rows) for rows in buckets]


async def _all_at_once(engine: ImageEngine, jobs: list[GenerationJob]) -> list[list[np.ndarray]]:
    """The jobs sent a step apart or so, so that they join the loop at different steps."""

    async def sent(index: int, job: GenerationJob) -> list[np.ndarray]:
        await asyncio.sleep(0.03 * index)
        return (await engine.generate(job)).images

    return await asyncio.gather(*(sent(index, job) for index, job in enumerate(jobs)))


def test_different_jobs_at_once_step_at_warmed_counts_and_each_image_is_its_own(compiled):
    """Fails without the padding (a step runs 3 or 5 rows) and without the loop's warm-up
    (a lone unguided image's single row compiles under traffic; SD3)."""
    pipeline, _, buckets = compiled
    rows: list[int] = []
    hook = pipeline.transformer.register_forward_pre_hook(
        lambda _module, _args, kwargs: rows.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True,
    )
    before = compiled_graphs()
    engine = ImageEngine(pipeline, 2, batching=LOOP, continuous=True, compiled=True)
    try:
        lone = [asyncio.run(engine.generate(each)).images for each in LONE]
        together = asyncio.run(_all_at_once(engine, JOBS))
        counted = engine.loop_rows
    finally:
        engine.shutdown()
        hook.remove()
    assert compiled_graphs() == before, "the loop compiled under traffic"
    assert set(rows) <= set(buckets), f"forwards at unwarmed row counts: {sorted(set(rows))}"
    assert 1 in rows and len(set(rows)) > 1
    # What the replica's counters say the padding cost: rows run, and of them padding.
    assert counted["rows"] == sum(rows) and 0 < counted["padding"] < counted["rows"] / 2
    alone_engine = ImageEngine(pipeline, 1, batching=BatchingConfig(max_batch_images=1))
    try:
        for sent, images in zip([*LONE, *JOBS], [*lone, *together], strict=True):
            alone = asyncio.run(alone_engine.generate(sent)).images
            for image, expected in zip(images, alone, strict=True):
                difference = np.abs(image.astype(np.int16) - expected.astype(np.int16))
                assert difference.max() <= 1 and (difference > 0).mean() <= 0.001
    finally:
        alone_engine.shutdown()
