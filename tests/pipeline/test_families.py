"""Every supported family (SD3, SDXL, FLUX, Chroma, Qwen-Image, Z-Image, FLUX.2 Klein)
through the same engine, on its embedded model.

Nothing on the request path is specific to one family: views, batching, seeds, cancellation,
previews and edits are checked here for each.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.generator.engine import ImageEngine
from deployments.generator.model.pipelines import RequestPipelines, load_pipeline
from deployments.generator.progress.previews import fit_previewer, spatial_latents
from deployments.jobs import GeneratedImages, GenerationJob, PartialImage, StepProgress
from tests.jobs import make_job

ALL_TASKS = frozenset({"text-to-image", "image-to-image", "inpaint"})


@dataclass(frozen=True)
class Family:
    """A row of the suite: what the family's embedded model is and takes. Adding a family is
    adding its builder (`deployments/generator/model/embedded/`) and a row here."""

    pipeline_class: str
    tasks: frozenset[str] = ALL_TASKS
    negative_prompt: bool = True  # FLUX's needs true CFG, which the service does not run
    guidance: str = "classifier-free"
    # Its image-to-image is its own class conditioned on reference images (FLUX.2): no
    # strength, every step runs, and a job's references are its call's alone.
    references: bool = False


FAMILIES = {
    "tiny-sd3": Family("StableDiffusion3Pipeline"),
    "tiny-sdxl": Family("StableDiffusionXLPipeline"),
    "tiny-flux": Family("FluxPipeline", negative_prompt=False, guidance="distilled"),
    # diffusers' Chroma inpainting reads FLUX's `guidance_embeds`, which Chroma lacks: the
    # replica finds it does not run, and serves no inpainting.
    "tiny-chroma": Family("ChromaPipeline", tasks=ALL_TASKS - {"inpaint"}),
    # A 5-D (video-style) VAE, and "true" CFG with a negative prompt.
    "tiny-qwen-image": Family("QwenImagePipeline", guidance="true-cfg"),
    "tiny-z-image": Family("ZImagePipeline"),
    # Its CFG's negative is always "" (it takes no negative prompt); it edits by conditioning
    # on reference images, and inpaints with its own class (found by name).
    "tiny-flux2-klein": Family("Flux2KleinPipeline", negative_prompt=False, references=True),
}


def family_of(pipeline) -> Family:
    (family,) = [f for f in FAMILIES.values() if f.pipeline_class == type(pipeline).__name__]
    return family


def needs(pipeline, task: str) -> None:
    if task not in family_of(pipeline).tasks:
        pytest.skip(f"{type(pipeline).__name__} has no {task} pipeline that runs")


# FLUX.2's image processor takes no reference under 64 pixels a side.
REFERENCE = np.random.default_rng(1).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)


def image_edit(pipeline, seed: int, image: np.ndarray, runs: int, **fields) -> GenerationJob:
    """An image-to-image job of `runs` denoising steps as the ingress makes one for the
    family: from `image` at strength 0.5 of twice the steps, or for a family conditioned on
    references, with a reference (its edits run every step)."""
    if family_of(pipeline).references:
        return job(seed, references=(REFERENCE,), num_inference_steps=runs, **fields)
    return job(seed, image=image, strength=0.5, num_inference_steps=2 * runs, **fields)


@pytest.fixture(scope="module", params=list(FAMILIES))
def pipeline(request):
    return load_pipeline(
        ModelConfig(id=request.param, source=f"embedded:{request.param}", device="cpu")
    )


@pytest.fixture(scope="module", params=list(FAMILIES))
def bfloat16_pipeline(request):
    """In bfloat16, where a cast of the shared weights shows: diffusers' `from_pipe` casts to
    float32 (design note 1), which on a float32 model is a no-op that no test could catch."""
    return load_pipeline(
        ModelConfig(
            id=request.param, source=f"embedded:{request.param}", device="cpu", dtype="bfloat16"
        )
    )


def job(seed: int = 0, **fields) -> GenerationJob:
    values = {"height": 32, "num_inference_steps": 3, "guidance_scale": 5.0}
    return make_job(seed, **{**values, **fields})


def storage_of(modules: dict) -> dict[str, list[tuple[torch.dtype, int]]]:
    return {
        name: [(p.dtype, p.data_ptr()) for p in module.parameters()]
        for name, module in modules.items()
        if isinstance(module, torch.nn.Module)
    }


def stream_alone(pipeline, streamed: GenerationJob) -> list:
    """Every event of one streamed job, on an engine of its own."""
    engine = ImageEngine(pipeline, worker_threads=1)

    async def collect():
        return [event async for event in engine.stream(streamed)]

    try:
        return asyncio.run(collect())
    finally:
        engine.shutdown()


def run_all(engine: ImageEngine, jobs: list[GenerationJob]) -> list[GeneratedImages]:
    async def gather():
        return await asyncio.gather(*(engine.generate(j) for j in jobs))

    return asyncio.run(gather())


def test_the_configured_class_is_loaded_and_takes_what_its_row_says(pipeline):
    family = family_of(pipeline)
    capabilities = RequestPipelines(pipeline).capabilities()
    assert capabilities.pipeline_class == family.pipeline_class
    assert set(capabilities.tasks) == family.tasks
    assert "guidance_scale" in capabilities.tasks["text-to-image"]
    from_an_image = family.tasks - {"text-to-image"}
    if family.references:
        from_an_image -= {"image-to-image"}
    assert all("strength" in capabilities.tasks[task] for task in from_an_image)
    assert bool(capabilities.reference_images) == family.references
    assert "mask" in capabilities.tasks.get("inpaint", {"mask"})
    negative = "negative_prompt" in capabilities.tasks["text-to-image"]
    assert negative == family.negative_prompt
    assert capabilities.guidance == family.guidance


def test_concurrent_batched_jobs_succeed_on_shared_unchanged_weights(bfloat16_pipeline):
    pipeline = bfloat16_pipeline
    before = storage_of(pipeline.components)
    assert torch.bfloat16 in {dtype for params in before.values() for dtype, _ in params}
    takes = RequestPipelines(pipeline).capabilities().tasks["text-to-image"]
    negative = "blurry" if "negative_prompt" in takes else None
    engine = ImageEngine(
        pipeline, worker_threads=2, batching=BatchingConfig(max_batch_images=4, max_wait_ms=20)
    )
    image = np.full((48, 32, 3), 90, dtype=np.uint8)
    jobs = [
        job(seed, prompt=f"prompt {seed}", negative_prompt=negative if seed % 2 else None)
        for seed in range(6)
    ] + [job(10, width=32, height=48, num_inference_steps=2, seeds=(10, 11))]
    if "image-to-image" in family_of(pipeline).tasks:
        # An edit among them: SDXL's edits are what moved a shared VAE (design note 9).
        jobs.append(image_edit(pipeline, 12, image, runs=2, width=32, height=48))
    try:
        results = run_all(engine, jobs)
    finally:
        engine.shutdown()
    for sent, result in zip(jobs, results, strict=True):
        assert [image.shape for image in result.images] == [(sent.height, sent.width, 3)] * len(
            sent.seeds
        )
    assert max(engine.batch_sizes) > 1, "compatible jobs shared a pipeline call"
    assert storage_of(pipeline.components) == before


def test_a_seed_gives_the_same_image_alone_and_in_a_batch(pipeline):
    """Within the CPU float32 bound of test_engine.py: 1 level in 0.1% of the values."""
    engine = ImageEngine(
        pipeline, worker_threads=1, batching=BatchingConfig(max_batch_images=8, max_wait_ms=50)
    )
    target = job(77, prompt="a red bicycle")

    async def alone_then_batched():
        alone = await engine.generate(target)
        blocker = asyncio.create_task(engine.generate(job(999, width=32, height=32)))
        await asyncio.sleep(0)
        others = [engine.generate(job(s, prompt=f"other {s}")) for s in range(3)]
        batched = await asyncio.gather(engine.generate(target), *others)
        await blocker
        return alone, batched[0]

    try:
        alone, batched = asyncio.run(alone_then_batched())
    finally:
        engine.shutdown()
    assert 4 in engine.batch_sizes, engine.batch_sizes
    difference = np.abs(alone.images[0].astype(np.int16) - batched.images[0].astype(np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() <= 0.001
    other_seed = run_all(ImageEngine(pipeline, worker_threads=1), [job(78, prompt="a red bicycle")])
    assert not np.array_equal(alone.images[0], other_seed[0].images[0])


def test_cancelling_stops_the_generation_at_the_next_step(pipeline):
    engine = ImageEngine(pipeline, worker_threads=1)

    async def cancel_midway():
        task = asyncio.create_task(engine.generate(job(0, num_inference_steps=500)))
        while engine.steps_run < 2:
            await asyncio.sleep(0.005)
        task.cancel()
        at_cancel = engine.steps_run
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)
        return at_cancel

    try:
        at_cancel = asyncio.run(cancel_midway())
    finally:
        engine.shutdown()
    assert engine.steps_run <= at_cancel + 1


def test_streamed_previews_come_at_the_latents_resolution(pipeline):
    events = stream_alone(pipeline, job(5, num_inference_steps=6, partial_images=2, seeds=(5, 6)))
    previews = [event for event in events if isinstance(event, PartialImage)]
    assert [(p.image_index, p.partial_image_index) for p in previews] == [
        (0, 0),
        (1, 0),
        (0, 1),
        (1, 1),
    ]
    # 1/8 of the image's side (FLUX's packed latents are unpacked first).
    assert {p.pixels.shape for p in previews} == {(32 // 8, 64 // 8, 3)}
    assert isinstance(events[-1], GeneratedImages)


def test_previews_map_the_very_latents_the_vae_decodes(pipeline):
    """What a preview maps to RGB, the (B, C, h, w) view of a step's latents unscaled as the
    previewer unscales them, is at the last step exactly what the pipeline hands its VAE to
    decode: FLUX's latents unpacked, FLUX.2's scattered by their position ids and
    de-normalised by the VAE's batch norm, Qwen-Image's per channel."""
    previewer = fit_previewer(pipeline)
    seen = {}

    def last_step(_pipeline, _step, _timestep, callback_kwargs: dict) -> dict:
        seen["latents"] = callback_kwargs["latents"]
        return callback_kwargs

    vae = pipeline.vae
    decode = vae.decode

    def recorded(latents, *args, **kwargs):
        seen["decoded"] = latents
        return decode(latents, *args, **kwargs)

    vae.decode = recorded  # the shared VAE's, on this instance only
    try:
        RequestPipelines(pipeline).view()(
            prompt="a lighthouse",
            width=64,
            height=32,
            num_inference_steps=2,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
            callback_on_step_end=last_step,
        )
    finally:
        del vae.decode
    spatial = spatial_latents(pipeline, 64, 32, seen["latents"]).float()
    decoded = seen["decoded"].float()
    if decoded.ndim == 5:  # a video-style VAE's one frame
        decoded = decoded[:, :, 0]
    torch.testing.assert_close(spatial * previewer._scale + previewer._shift, decoded)


def test_edits_run_on_views_over_the_same_weights(bfloat16_pipeline):
    pipeline = bfloat16_pipeline
    needs(pipeline, "image-to-image")
    needs(pipeline, "inpaint")
    views = RequestPipelines(pipeline)
    shared = storage_of(pipeline.components)
    for task in ("image-to-image", "inpaint"):
        view = views.view(task)
        # A family conditioned on references edits with its own class.
        own_class = task == "image-to-image" and family_of(pipeline).references
        assert (type(view) is type(pipeline)) == own_class
        assert storage_of(view.components) == {
            name: storage for name, storage in shared.items() if name in view.components
        }
        assert view.scheduler is not pipeline.scheduler

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 64, 3), dtype=np.uint8)
    mask = np.zeros((32, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    engine = ImageEngine(
        pipeline, worker_threads=1, batching=BatchingConfig(max_batch_images=4, max_wait_ms=20)
    )
    edits = [
        image_edit(pipeline, 1, image, runs=2),
        image_edit(pipeline, 2, image, runs=2),
        job(3, image=image, mask=mask, strength=1.0, num_inference_steps=2, seeds=(3, 4)),
    ]
    try:
        results = run_all(engine, edits)
    finally:
        engine.shutdown()
    for result, sent in zip(results, edits, strict=True):
        assert [i.shape for i in result.images] == [(32, 64, 3)] * sent.num_images
    # The first edit starts alone on the idle replica; the second forms the next batch (the
    # inpainting job cannot join it, nor one reference edit another). Each edit runs 2 steps
    # (strength 1.0 of 2 for the inpainting).
    assert engine.batch_sizes == [1, 1, 2]
    assert engine.steps_run == 2 + 2 + 2
    assert storage_of(pipeline.components) == shared


def test_a_streamed_edit_reports_the_steps_it_really_runs(pipeline):
    needs(pipeline, "image-to-image")
    image = np.full((32, 64, 3), 90, dtype=np.uint8)
    events = stream_alone(pipeline, image_edit(pipeline, 8, image, runs=4, partial_images=1))
    progress = [event for event in events if isinstance(event, StepProgress)]
    assert progress[-1] == StepProgress(step=4, total_steps=4)  # 8 steps x strength 0.5, or 4
    assert [type(event) for event in events].count(PartialImage) == 1


def test_seed_negative_prompt_and_guidance_act_as_the_family_takes_them(pipeline):
    """The same request twice is the same image; a negative prompt (where the family takes
    one) and another guidance scale each make another."""
    engine = ImageEngine(pipeline, worker_threads=1)
    base = job(3, prompt="a lighthouse", guidance_scale=5.0)
    variants = [base, base, job(3, prompt="a lighthouse", guidance_scale=2.0)]
    if family_of(pipeline).negative_prompt:
        variants.append(job(3, prompt="a lighthouse", guidance_scale=5.0, negative_prompt="fog"))
    try:
        first, again, *others = [result.images[0] for result in run_all(engine, variants)]
    finally:
        engine.shutdown()
    np.testing.assert_array_equal(first, again)
    for other in others:
        assert not np.array_equal(first, other)
