"""The continuous loop (`batching.continuous`) on the real embedded SD3, FLUX, Chroma and
Z-Image pipelines: images that join one denoising loop at different steps, with their own
steps, guidance, negative prompts and adapters, each come out as the same request alone
through the diffusers pipeline would make it; a job that leaves (cancelled) or fails (a
poisoned prompt, out of memory) changes nothing for the others.

Each engine here has ONE worker thread, so one lane: every job shares its loop. The
tolerance is the project's for batched float32 (design note 8): at most one level of 255 in
at most 0.1% of the values, the float noise of other batch neighbours in a matrix product.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from deployments.config.model_config import AdapterConfig, BatchingConfig, ModelConfig
from deployments.generator.adapters.adapter_store import AdapterStore
from deployments.generator.engine import ImageEngine
from deployments.generator.model.components import to_uint8
from deployments.generator.model.pipelines import RequestPipelines, load_pipeline
from deployments.jobs import (
    GeneratedImages,
    GenerationJob,
    GenerationOutOfMemory,
    PartialImage,
    ReplicaBroken,
    StepProgress,
)
from tests.jobs import make_job

# A lone UTF-16 surrogate: the tokenizer rejects the prompt (TypeError).
POISONED_PROMPT = "a lighthouse \ud800"
CONTINUOUS = BatchingConfig(max_batch_images=8, max_wait_ms=0, continuous=True)
ADAPTERS = [
    AdapterConfig(id="ink", source="embedded:tiny-sd3/ink"),
    AdapterConfig(id="paper", source="embedded:tiny-sd3/paper"),
]


def job(seed: int, steps: int = 4, guidance: float = 4.5, **fields) -> GenerationJob:
    values = {
        "prompt": f"a lighthouse, take {seed}",
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "request_id": f"request-{seed}",
        **fields,
    }
    return make_job(seed, **values)


def assert_nearly_equal(a: np.ndarray, b: np.ndarray) -> None:
    difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert difference.max() <= 1
    assert (difference > 0).mean() <= 0.001


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux", "tiny-chroma", "tiny-z-image"])
def pipeline(request):
    return load_pipeline(
        ModelConfig(id=request.param, source=f"embedded:{request.param}", device="cpu")
    )


@pytest.fixture(scope="module")
def sd3():
    return load_pipeline(ModelConfig(device="cpu"))


def loop_engine(
    pipeline,
    adapters: AdapterStore | None = None,
    batching: BatchingConfig = CONTINUOUS,
    pool: ThreadPoolExecutor | None = None,
) -> ImageEngine:
    engine = ImageEngine(
        pipeline,
        worker_threads=1,
        batching=batching,
        adapters=adapters,
        pool=pool,
        continuous=True,
    )
    assert engine.continuous
    return engine


def alone_through_diffusers(pipeline, job: GenerationJob) -> list[np.ndarray]:
    """The job's images from the diffusers pipeline itself, one call per image."""
    view = RequestPipelines(pipeline).view()
    images = []
    for seed in job.seeds:
        arguments = {
            "prompt": job.prompt,
            "width": job.width,
            "height": job.height,
            "num_inference_steps": job.num_inference_steps,
            "guidance_scale": job.guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(seed)],
            "output_type": "np",
        }
        if job.negative_prompt is not None:
            arguments["negative_prompt"] = job.negative_prompt
        images.append(to_uint8(view(**arguments).images)[0])
    return images


async def wait_for_steps(engine: ImageEngine, steps: int) -> None:
    while engine.steps_run < steps:
        await asyncio.sleep(0.002)


def run(coroutine):
    return asyncio.run(coroutine)


def held_together_then_alone(
    loop: ImageEngine, alone: ImageEngine, jobs: list[GenerationJob], all_in: threading.Event
) -> tuple[list[GeneratedImages], list[GeneratedImages]]:
    """Every job submitted to `loop`, whose threads wait for `all_in`, set once every job is
    in its lane; then each job alone on `alone`. Both engines are shut down after."""

    async def together_then_alone():
        tasks = [asyncio.ensure_future(loop.generate(each)) for each in jobs]
        while loop.work.held().jobs < len(jobs):
            await asyncio.sleep(0.005)
        all_in.set()
        mixed = await asyncio.gather(*tasks)
        return mixed, [await alone.generate(each) for each in jobs]

    try:
        return run(together_then_alone())
    finally:
        loop.shutdown()
        alone.shutdown()


def test_images_joining_at_different_steps_equal_each_request_alone(pipeline):
    """Four requests with different steps, guidance, negative prompts and image counts join
    one loop two steps apart; each equals the diffusers pipeline run on it alone. The guided
    rows have negative prompts of their own (two different texts, and none), so a loop that
    gave every row the same negative, or none, would differ from the pipeline alone."""
    negatives = ["blurry, low contrast", "", "a watercolour", None]
    if type(pipeline).__name__ == "FluxPipeline":
        negatives = [None] * 4  # FLUX takes none (the ingress refuses it, see pipelines.py)
    jobs = [
        job(1, steps=12, guidance=7.0, negative_prompt=negatives[0]),
        job(2, steps=4, guidance=1.0, negative_prompt=negatives[1], seeds=(2, 3)),
        job(4, steps=8, guidance=3.5, negative_prompt=negatives[2]),
        job(5, steps=6, guidance=5.0, negative_prompt=negatives[3]),
    ]
    engine = loop_engine(pipeline)

    async def staggered() -> list[GeneratedImages]:
        tasks = []
        for index, each in enumerate(jobs):
            await wait_for_steps(engine, 2 * index)
            tasks.append(asyncio.create_task(engine.generate(each)))
        return await asyncio.gather(*tasks)

    try:
        results = run(staggered())
    finally:
        engine.shutdown()
    for each, result in zip(jobs, results, strict=True):
        for got, alone in zip(result.images, alone_through_diffusers(pipeline, each), strict=True):
            assert_nearly_equal(got, alone)
    # They really shared the loop, joining while it ran: later jobs shared steps with the
    # first, and the steps' sizes grew and shrank as images joined and left.
    assert all(result.batch_images > 1 for result in results)
    assert len(set(engine.batch_sizes)) >= 3
    # One step at a time over everything in flight: fewer steps than the jobs' images took.
    assert engine.steps_run < sum(each.num_inference_steps for each in jobs)


def test_different_adapters_share_one_forward_and_each_image_is_its_own():
    """Base, one adapter, another at another scale, both composed, and an adapter without
    guidance: all in one step, each equal to the request alone on the request-level engine
    (which runs the diffusers pipeline with the adapters set on it)."""
    jobs = [
        job(1, steps=2),
        job(1, steps=2, adapters=(("ink", 1.0),)),
        job(1, steps=2, adapters=(("paper", 0.5),)),
        job(1, steps=2, adapters=(("ink", 0.5), ("paper", 0.7))),
        job(1, steps=3, guidance=1.0, adapters=(("ink", 1.0),)),
    ]
    # Pipelines of their own: adapters stay loaded in a pipeline's modules.
    shared, reference = (load_pipeline(ModelConfig(device="cpu")) for _ in range(2))
    # The loop's one thread is held until every job is in its lane, so that all five join
    # its first step however slowly the machine submits them (not by luck of timing).
    pool, all_in = ThreadPoolExecutor(1), threading.Event()
    pool.submit(all_in.wait, 120)
    loop = loop_engine(shared, AdapterStore(shared, ADAPTERS, max_loaded=4), pool=pool)
    alone = ImageEngine(reference, worker_threads=1, adapters=AdapterStore(reference, ADAPTERS, 4))

    mixed, references = held_together_then_alone(loop, alone, jobs, all_in)
    for got, reference in zip(mixed, references, strict=True):
        assert_nearly_equal(got.images[0], reference.images[0])
    assert max(loop.batch_sizes) == len(jobs)  # one forward held every adapter set
    # Same seed and prompt: only the adapters made the images differ, so the check above
    # compares five different images.
    assert len({reference.images[0].tobytes() for reference in references}) == len(jobs)


def test_a_cancelled_job_leaves_the_loop_and_the_others_are_unchanged(pipeline):
    engine = loop_engine(pipeline)
    kept, dropped = job(1, steps=20), job(2, steps=20)

    async def cancel_one():
        keep = asyncio.create_task(engine.generate(kept))
        drop = asyncio.create_task(engine.generate(dropped))
        await wait_for_steps(engine, 3)
        cancelled_at.append(engine.steps_run)  # the poll may see step 3 a step late
        drop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await drop
        return await keep

    cancelled_at: list[int] = []
    try:
        result = run(cancel_one())
    finally:
        engine.shutdown()
    assert_nearly_equal(result.images[0], alone_through_diffusers(pipeline, kept)[0])
    sizes = list(engine.batch_sizes)
    # It left within two steps of its cancellation; the kept job ran its 20 alone after.
    assert sizes.count(2) <= cancelled_at[0] + 2 and sizes[-10:] == [1] * 10
    engine.check_health()


def test_a_poisoned_job_fails_alone_whether_it_joins_first_or_midway(sd3):
    engine = loop_engine(sd3)
    good = [job(1, steps=10), job(2, steps=6), job(3, steps=4)]

    async def poisoned_twice():
        tasks = [asyncio.create_task(engine.generate(each)) for each in good[:2]]
        tasks.append(asyncio.create_task(engine.generate(job(9, prompt=POISONED_PROMPT))))
        await wait_for_steps(engine, 3)
        tasks.append(asyncio.create_task(engine.generate(job(8, prompt=POISONED_PROMPT))))
        tasks.append(asyncio.create_task(engine.generate(good[2])))
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        first, second, bad, bad_midway, third = run(poisoned_twice())
    finally:
        engine.shutdown()
    assert isinstance(bad, TypeError) and isinstance(bad_midway, TypeError)
    for each, result in zip(good, (first, second, third), strict=True):
        assert_nearly_equal(result.images[0], alone_through_diffusers(sd3, each)[0])
    engine.check_health()


def test_a_step_out_of_memory_runs_in_halves_and_an_image_too_large_fails_alone(sd3, monkeypatch):
    """A forward of more than 1 row runs out of memory: the step runs one image at a time
    (a job of two images too, as the request-level path splits a call), and every image
    equals the pipeline alone; an image whose own rows do not fit (guidance: its
    unconditional row beside its own) fails its job with its own 503."""
    transformer = sd3.transformer
    original = type(transformer).forward
    forwards = []

    def limited(self, hidden_states, *args, **kwargs):
        forwards.append(hidden_states.shape[0])
        if hidden_states.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(type(transformer), "forward", limited)
    engine = loop_engine(sd3)
    fits = [job(1, guidance=1.0), job(2, steps=6, guidance=1.0), job(3, seeds=(3, 4), guidance=1.0)]
    too_large = job(5, guidance=4.5)

    async def together():
        return await asyncio.gather(
            *(engine.generate(each) for each in [*fits, too_large]), return_exceptions=True
        )

    try:
        *results, failed = run(together())
    finally:
        engine.shutdown()
    monkeypatch.undo()
    assert isinstance(failed, GenerationOutOfMemory)
    assert max(forwards) > 1 and 1 in forwards  # it ran out, then ran in parts
    for each, result in zip(fits, results, strict=True):
        for got, alone in zip(result.images, alone_through_diffusers(sd3, each), strict=True):
            assert_nearly_equal(got, alone)
    engine.check_health()


def test_a_streamed_job_in_the_loop_gets_its_own_progress_and_previews(pipeline):
    engine = loop_engine(pipeline)
    streamed = job(1, steps=6, partial_images=2)

    async def stream_beside_another():
        other = asyncio.create_task(engine.generate(job(2, steps=12)))
        await wait_for_steps(engine, 2)
        events = [event async for event in engine.stream(streamed)]
        await other
        return events

    try:
        events = run(stream_beside_another())
    finally:
        engine.shutdown()
    progress = [event for event in events if isinstance(event, StepProgress)]
    previews = [event for event in events if isinstance(event, PartialImage)]
    assert progress[-1] == StepProgress(step=6, total_steps=6)
    assert [event.partial_image_index for event in previews] == [0, 1]
    result = events[-1]
    assert isinstance(result, GeneratedImages) and result.batch_images == 2
    assert_nearly_equal(result.images[0], alone_through_diffusers(pipeline, streamed)[0])


def test_a_device_failure_in_the_loop_fails_its_jobs_and_the_replica(sd3, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(type(sd3.transformer), "forward", broken)
    engine = loop_engine(sd3)

    async def two():
        return await asyncio.gather(
            engine.generate(job(1)), engine.generate(job(2)), return_exceptions=True
        )

    try:
        outcomes = run(two())
    finally:
        engine.shutdown()
    assert all(isinstance(outcome, ReplicaBroken) for outcome in outcomes)
    with pytest.raises(ReplicaBroken):
        engine.check_health()


def test_request_level_work_gets_a_thread_while_the_loop_stays_busy(sd3):
    """An edit (request-level) waits for the loop's thread; the loop yields it at a step
    boundary although new text-to-image jobs keep coming."""
    engine = loop_engine(sd3)
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    edit = job(7, image=image, strength=0.5)
    finished: list[str] = []

    async def keep_busy():
        async def stream_of_jobs():
            for seed in range(40):
                await engine.generate(job(seed, steps=4))
                finished.append("loop")

        busy = [asyncio.create_task(stream_of_jobs()) for _ in range(2)]
        await wait_for_steps(engine, 4)
        await engine.generate(edit)
        finished.append("edit")
        await asyncio.gather(*busy)

    try:
        run(keep_busy())
    finally:
        engine.shutdown()
    assert finished.index("edit") < len(finished) - 10  # it did not wait for the loop to end


def test_a_request_of_many_images_is_not_passed_by_a_stream_of_single_ones(sd3):
    """Room for 4 images a step: a 4-image request waits for the loop to empty of its size,
    and the single-image requests behind it wait for it, instead of filling every gap."""
    engine = loop_engine(sd3, batching=CONTINUOUS.model_copy(update={"max_batch_images": 4}))
    order: list[str] = []

    async def many_behind_singles():
        async def singles(client: int):
            for seed in range(10):
                await engine.generate(job(100 * client + seed, steps=3))
                order.append("single")

        # More clients than the step has room for: singles always wait in line.
        clients = [asyncio.create_task(singles(client)) for client in range(6)]
        await wait_for_steps(engine, 2)
        result = await engine.generate(job(7, steps=3, seeds=(7, 8, 9, 10)))
        order.append("four")
        await asyncio.gather(*clients)
        return result

    try:
        result = run(many_behind_singles())
    finally:
        engine.shutdown()
    assert len(result.images) == 4
    assert order.index("four") < len(order) - 20  # long before the singles ran out


def text_encoder_adapter(directory) -> AdapterConfig:
    """A real LoRA of tiny-sd3's first text encoder only (random, strong enough to show)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    encoder = load_pipeline(ModelConfig(device="cpu")).text_encoder
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    state = get_peft_model_state_dict(inject_adapter_in_model(config, encoder))
    generator = torch.Generator().manual_seed(5)
    state = {key: torch.randn(value.shape, generator=generator) for key, value in state.items()}
    StableDiffusion3Pipeline.save_lora_weights(
        directory, text_encoder_lora_layers=state, safe_serialization=True
    )
    return AdapterConfig(id="clip", source=str(directory))


def test_an_adapter_on_a_text_encoder_runs_per_call_and_the_loop_s_prompts_stay_base(tmp_path):
    """The loop computes adapters per row in the denoiser only: a request whose adapter has
    text-encoder weights runs request-level, and after it the loop's own prompts go through
    the base text encoders again (not the set that request left on them)."""
    configs = [text_encoder_adapter(tmp_path), *ADAPTERS]
    shared, reference = (load_pipeline(ModelConfig(device="cpu")) for _ in range(2))
    loop = loop_engine(shared, AdapterStore(shared, configs, max_loaded=3))
    alone = ImageEngine(reference, worker_threads=1, adapters=AdapterStore(reference, configs, 3))
    base, clip = job(1, steps=2), job(1, steps=2, adapters=(("clip", 1.0),))

    async def clip_then_base():
        with_clip = await loop.generate(clip)
        after = await loop.generate(base)
        return with_clip, after, await alone.generate(clip), await alone.generate(base)

    try:
        with_clip, after, clip_alone, base_alone = run(clip_then_base())
    finally:
        loop.shutdown()
        alone.shutdown()
    assert not np.array_equal(clip_alone.images[0], base_alone.images[0])  # it does something
    assert_nearly_equal(with_clip.images[0], clip_alone.images[0])
    assert_nearly_equal(after.images[0], base_alone.images[0])


def test_lanes_needing_more_adapters_than_slots_load_each_once_per_job_not_per_step():
    """Two lanes, two adapter slots, four adapters: one lane's images use two, the other's
    the two others. A lane never evicts what the other lane's images step with (each would
    load its pair back at every step); a job whose adapter has no free slot waits for one.
    Every image is still its request alone."""
    names = ["ink", "paper", "ink-again", "paper-again"]
    adapters = [
        *ADAPTERS,
        AdapterConfig(id="ink-again", source="embedded:tiny-sd3/ink"),
        AdapterConfig(id="paper-again", source="embedded:tiny-sd3/paper"),
    ]
    # In submission order, the lanes take turns: ink and ink-again in one, the papers in the
    # other (least work left, the first lane on a tie).
    jobs = [job(seed, steps=6, adapters=((names[seed], 1.0),)) for seed in range(4)]
    shared, reference = (load_pipeline(ModelConfig(device="cpu")) for _ in range(2))
    store = AdapterStore(shared, adapters, max_loaded=2)
    # Both lanes' threads are held until every job is in its lane, so that both lanes have
    # their pairs in flight at once (not by luck of timing).
    pool, all_in = ThreadPoolExecutor(2), threading.Event()
    for _ in range(2):
        pool.submit(all_in.wait, 120)
    loop = ImageEngine(
        shared, worker_threads=2, batching=CONTINUOUS, adapters=store, pool=pool, continuous=True
    )
    alone = ImageEngine(reference, worker_threads=1, adapters=AdapterStore(reference, adapters, 4))

    mixed, references = held_together_then_alone(loop, alone, jobs, all_in)
    for got, expected in zip(mixed, references, strict=True):
        assert_nearly_equal(got.images[0], expected.images[0])
    # One load per job; lanes that evict each other's load about 2 per step each.
    assert store.loads <= len(jobs), store.loads
