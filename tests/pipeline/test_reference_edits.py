"""Edits of a model conditioned on reference images (FLUX.2 Klein, on its embedded model):
its own class edits, given several images and no strength; the replica finds at start that
it uses a second reference; different edits sent at once each equal the same edit alone.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.generator.engine import ImageEngine
from deployments.generator.model.pipelines import (
    DEFAULT_REFERENCE_ASPECT,
    RequestPipelines,
    load_pipeline,
)
from deployments.jobs import MAX_INPUT_IMAGES, GeneratedImages, GenerationJob
from tests.jobs import make_job

MODEL = "tiny-flux2-klein"


@pytest.fixture(scope="module")
def klein():
    return load_pipeline(ModelConfig(id=MODEL, source=f"embedded:{MODEL}", device="cpu"))


def picture(seed: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def reference_edit(seed: int, *references: np.ndarray, **fields) -> GenerationJob:
    values = {"width": 32, "height": 32, "num_inference_steps": 3, "guidance_scale": 4.0}
    return make_job(seed, references=references, **{**values, **fields})


def run_all(engine: ImageEngine, jobs: list[GenerationJob]) -> list[GeneratedImages]:
    async def gather():
        return await asyncio.gather(*(engine.generate(job) for job in jobs))

    return asyncio.run(gather())


def alone(pipeline, job: GenerationJob) -> list[np.ndarray]:
    engine = ImageEngine(pipeline, worker_threads=1)
    try:
        (result,) = run_all(engine, [job])
    finally:
        engine.shutdown()
    return result.images


def test_the_replica_finds_its_edits_take_several_references_and_no_strength(klein):
    capabilities = RequestPipelines(klein).capabilities()
    assert capabilities.reference_images == MAX_INPUT_IMAGES
    assert "strength" not in capabilities.tasks["image-to-image"]
    assert capabilities.edit_step_rounding.get("image-to-image") is None
    # Read off the pipeline's own check of its inputs, which the ingress fits them to.
    assert (capabilities.reference_min_side, capabilities.reference_max_aspect) == (64, 8)


def test_every_reference_counts_and_each_keeps_its_own_shape(klein):
    first, second = picture(1, 64, 64), picture(2, 96, 64)
    one = alone(klein, reference_edit(5, first))
    two = alone(klein, reference_edit(5, first, second))
    swapped = alone(klein, reference_edit(5, second, first))
    text_only = alone(klein, make_job(5, width=32, height=32, num_inference_steps=3))
    assert one[0].shape == two[0].shape == (32, 32, 3)
    assert not np.array_equal(one[0], two[0])  # the second reference is used
    assert not np.array_equal(two[0], swapped[0])  # in the order sent
    assert not np.array_equal(one[0], text_only[0])


def test_different_reference_edits_at_once_each_equal_the_edit_alone(klein):
    """Edits with their own references, prompts and seeds, and a text-to-image request,
    sent at once to an engine that batches: no edit's references reach another's images
    (a reference edit's references are its whole call's: it shares no call)."""
    jobs = [
        reference_edit(1, picture(10, 64, 64), prompt="a red door", n=2),
        reference_edit(3, picture(11, 64, 64), picture(12, 64, 128), prompt="a blue door"),
        reference_edit(4, picture(13, 64, 64), prompt="a red door"),
        make_job(6, width=32, height=32, num_inference_steps=3, guidance_scale=4.0),
    ]
    engine = ImageEngine(
        klein, worker_threads=2, batching=BatchingConfig(max_batch_images=4, max_wait_ms=50)
    )
    try:
        together = run_all(engine, jobs)
    finally:
        engine.shutdown()
    for job, result in zip(jobs, together, strict=True):
        for got, expected in zip(result.images, alone(klein, job), strict=True):
            difference = np.abs(got.astype(np.int16) - expected.astype(np.int16))
            assert difference.max() <= 1 and (difference > 0).mean() <= 0.001


def test_a_step_distilled_klein_keeps_its_option_in_every_view_and_takes_no_guidance(klein):
    """FLUX.2 Klein 4B/9B are step-distilled (`is_distilled`): their pipeline ignores
    `guidance_scale`. A view must keep the option (it is config, not a component), and the
    request's `guidance_scale` is refused rather than ignored."""
    distilled = type(klein)(**klein.components, is_distilled=True)
    pipelines = RequestPipelines(distilled)
    assert pipelines.view().config.is_distilled
    assert pipelines.view("image-to-image").config.is_distilled
    capabilities = pipelines.capabilities()
    assert capabilities.guidance == "none"
    assert "guidance_scale" not in capabilities.tasks["text-to-image"]
    assert not RequestPipelines(klein).view().config.is_distilled


def test_a_pipeline_that_says_nothing_of_references_gets_the_default_bounds():
    """No input check of its own (SD3's image processor has none): any side, at most 8:1."""
    sd3 = load_pipeline(ModelConfig(device="cpu"))
    assert RequestPipelines(sd3).reference_rules() == (1, DEFAULT_REFERENCE_ASPECT)
    assert DEFAULT_REFERENCE_ASPECT == 8
