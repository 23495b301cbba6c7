"""A model whose guidance is its pipeline's "true" CFG (`true_cfg_scale` with a negative
prompt: a FLUX without guidance embedding, as Qwen-Image is guided) gets the
request's `guidance_scale` and `negative_prompt` there, instead of a `guidance_scale` the
pipeline would silently ignore; each image equals the diffusers pipeline run alone so."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.generator.engine import ImageEngine
from deployments.generator.model.components import to_uint8
from deployments.generator.model.embedded.tiny_flux import build_tiny_flux_pipeline
from deployments.generator.model.pipelines import RequestPipelines, load_pipeline
from tests.jobs import make_job


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    directory = tmp_path_factory.mktemp("flux-true-cfg")
    build_tiny_flux_pipeline(guidance_embeds=False).save_pretrained(directory)
    return load_pipeline(ModelConfig(id="flux-cfg", source=str(directory), device="cpu"))


def alone(pipeline, **arguments) -> np.ndarray:
    view = RequestPipelines(pipeline).view()
    images = view(
        prompt="a lighthouse",
        width=64,
        height=32,
        num_inference_steps=3,
        generator=[torch.Generator("cpu").manual_seed(5)],
        output_type="np",
        **arguments,
    ).images
    return to_uint8(images)[0]


def test_guidance_and_negative_prompt_are_the_pipelines_true_cfg(pipeline):
    engine = ImageEngine(pipeline, worker_threads=1)
    capabilities = engine.capabilities()
    assert capabilities.guidance == "true-cfg"
    assert {"guidance_scale", "negative_prompt"} <= capabilities.tasks["text-to-image"]
    jobs = [
        make_job(5, prompt="a lighthouse", width=64, height=32, num_inference_steps=3, **fields)
        for fields in (
            {"guidance_scale": 4.0, "negative_prompt": "fog"},
            {"guidance_scale": 4.0},
            {"guidance_scale": 1.0},
        )
    ]

    async def each():
        return [await engine.generate(job) for job in jobs]

    try:
        guided, guided_without_negative, unguided = [r.images[0] for r in asyncio.run(each())]
    finally:
        engine.shutdown()
    np.testing.assert_array_equal(
        guided, alone(pipeline, true_cfg_scale=4.0, negative_prompt="fog")
    )
    np.testing.assert_array_equal(
        guided_without_negative, alone(pipeline, true_cfg_scale=4.0, negative_prompt="")
    )
    np.testing.assert_array_equal(unguided, alone(pipeline))
    assert not np.array_equal(guided, unguided)


def test_different_true_cfg_requests_batched_at_once_each_equal_their_run_alone(pipeline):
    """One pipeline call over several requests (their own prompts, seeds, negative prompts):
    each image is the request's alone, within batched float32's tolerance (design note 8)."""
    jobs = [
        make_job(seed, prompt=f"a lighthouse, take {seed}", width=64, height=32,
                 num_inference_steps=3, guidance_scale=4.0, negative_prompt=negative)
        for seed, negative in ((1, "fog"), (2, "rain"), (3, "snow"))
    ]  # fmt: skip
    batched = ImageEngine(
        pipeline, worker_threads=1, batching=BatchingConfig(max_batch_images=4, max_wait_ms=200)
    )
    alone = ImageEngine(pipeline, worker_threads=1)

    async def together():
        return await asyncio.gather(*(batched.generate(job) for job in jobs))

    try:
        results = asyncio.run(together())
        singles = [asyncio.run(alone.generate(job)) for job in jobs]
    finally:
        batched.shutdown()
        alone.shutdown()
    assert max(batched.batch_sizes) > 1, "the requests shared a pipeline call"
    for result, single in zip(results, singles, strict=True):
        difference = np.abs(result.images[0].astype(np.int16) - single.images[0].astype(np.int16))
        assert difference.max() <= 1 and (difference > 0).mean() <= 0.001
