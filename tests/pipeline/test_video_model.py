"""The video model on the embedded tiny Wan (text-to-video and image-to-video): a request makes
the clip the pipeline itself makes from the same arguments and seed, concurrent calls do not
disturb each other, progress reports every step, cancellation stops at the next step's end,
and what `check` lets through generates (and what it refuses names the parameter)."""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from deployments.generator.model.components import to_uint8
from deployments.video.video_model import (
    DEFAULT_FPS,
    DEFAULT_MAX_FRAMES,
    VideoCancelled,
    VideoModel,
    VideoRequest,
)

STEPS = 3
REQUEST = VideoRequest(
    prompt="a lighthouse in a storm",
    negative_prompt="blurry",
    width=48,  # not square: a swapped width and height shows
    height=32,
    num_frames=5,
    num_inference_steps=STEPS,
    guidance_scale=4.0,
    seed=7,
)
# Another request in every parameter that shapes a call's work.
OTHER = VideoRequest(
    prompt="a cat on a sofa",
    negative_prompt=None,
    width=32,
    height=32,
    num_frames=9,
    num_inference_steps=STEPS,
    guidance_scale=None,
    seed=11,
)


@pytest.fixture(scope="module")
def model() -> VideoModel:
    return VideoModel.load("embedded:tiny-wan")


@pytest.fixture(scope="module")
def i2v_model() -> VideoModel:
    return VideoModel.load("embedded:tiny-wan-i2v")


def first_frame(width: int = 48, height: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_a_clip_is_uint8_frames_of_the_size_asked(model):
    frames = model.generate(REQUEST)
    assert frames.shape == (5, 32, 48, 3)
    assert frames.dtype == np.uint8
    assert model.generate(OTHER).shape == (9, 32, 32, 3)


def test_a_seed_makes_the_same_clip_and_another_seed_another(model):
    first = model.generate(REQUEST)
    assert np.array_equal(model.generate(REQUEST), first)
    assert not np.array_equal(model.generate(replace(REQUEST, seed=8)), first)


def test_a_clip_is_what_the_pipeline_makes_from_the_same_arguments(model):
    direct = model.pipeline(
        prompt=REQUEST.prompt,
        negative_prompt=REQUEST.negative_prompt,
        width=REQUEST.width,
        height=REQUEST.height,
        num_frames=REQUEST.num_frames,
        num_inference_steps=REQUEST.num_inference_steps,
        guidance_scale=REQUEST.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(REQUEST.seed),
        output_type="np",
    ).frames[0]
    frames = model.generate(REQUEST)
    assert np.abs(frames.astype(int) - to_uint8(direct)).max() <= 1
    # Without a guidance scale, the pipeline's own default.
    unguided = model.pipeline(
        prompt=OTHER.prompt,
        width=OTHER.width,
        height=OTHER.height,
        num_frames=OTHER.num_frames,
        num_inference_steps=OTHER.num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(OTHER.seed),
        output_type="np",
    ).frames[0]
    assert np.abs(model.generate(OTHER).astype(int) - to_uint8(unguided)).max() <= 1


def run_together(model: VideoModel, requests: list[VideoRequest]) -> list[np.ndarray]:
    """The requests' clips from one thread each, in lockstep: each step of one waits for the
    same step of the others, so their steps and decodes overlap."""
    barrier = threading.Barrier(len(requests), timeout=30)
    results: list[np.ndarray | BaseException | None] = [None] * len(requests)

    def run(index: int) -> None:
        try:
            results[index] = model.generate(requests[index], on_step=lambda *_: barrier.wait())
        except BaseException as error:  # re-raised in the test's thread, below
            results[index] = error
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def test_requests_run_at_once_make_what_each_makes_alone(model):
    """Each call has its own scheduler (UniPC keeps its last outputs between steps) and
    generator, and the VAE's frame cache (kept on the module) is used by one call at a time."""
    requests = [REQUEST, OTHER]
    alone = [model.generate(request) for request in requests]
    together = run_together(model, requests)
    for request, clip, expected in zip(requests, together, alone, strict=True):
        assert np.array_equal(clip, expected), request.prompt


def test_image_to_video_requests_run_at_once_make_what_each_makes_alone(i2v_model):
    """Image-to-video encodes the first frame with the VAE too: encodes and decodes of
    concurrent calls share its frame cache."""
    requests = [
        replace(REQUEST, image=first_frame()),
        replace(OTHER, image=first_frame(32, 32, seed=1)),
    ]
    alone = [i2v_model.generate(request) for request in requests]
    together = run_together(i2v_model, requests)
    for clip, expected in zip(together, alone, strict=True):
        assert np.array_equal(clip, expected)


def test_every_step_is_reported(model):
    steps = []
    model.generate(
        replace(REQUEST, num_inference_steps=5), on_step=lambda *step: steps.append(step)
    )
    assert steps == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_cancelling_stops_at_the_end_of_the_step_running(model):
    steps = []
    cancel = threading.Event()

    def on_step(done: int, total: int) -> None:
        steps.append(done)
        if done == 2:
            cancel.set()  # as another thread would, while step 2 ends

    with pytest.raises(VideoCancelled):
        model.generate(
            replace(REQUEST, num_inference_steps=6), on_step=on_step, cancelled=cancel.is_set
        )
    assert steps == [1, 2]
    # Cancelled before it starts: no step runs.
    steps.clear()
    with pytest.raises(VideoCancelled):
        model.generate(REQUEST, on_step=on_step, cancelled=lambda: True)
    assert steps == []
    # The model is not left in a state that changes the next call.
    assert np.array_equal(model.generate(REQUEST), model.generate(REQUEST))


def test_the_limits_are_the_pipelines(model, i2v_model):
    pipeline = model.pipeline
    patch = pipeline.transformer.config.patch_size
    spatial = pipeline.vae.config.scale_factor_spatial
    limits = model.limits
    # Wan's pipeline itself refuses sizes that are not multiples of 16.
    assert limits.size_multiple == math.lcm(16, spatial * patch[1], spatial * patch[2])
    assert limits.frame_multiple == pipeline.vae.config.scale_factor_temporal == 4
    assert limits.max_frames == DEFAULT_MAX_FRAMES
    assert limits.default_fps == DEFAULT_FPS
    assert limits.guidance
    assert not limits.image_to_video
    assert i2v_model.limits.image_to_video
    rope = pipeline.transformer.config.rope_max_seq_len
    assert limits.max_width == limits.max_height == rope * patch[1] * spatial


def test_the_largest_size_generates_and_one_multiple_more_fails_in_the_pipeline(model):
    """The largest width `check` lets through runs; past it, the transformer's rotary table
    has no position for the patches, so the bound is the model's, not a guess."""
    multiple, widest = model.limits.size_multiple, model.limits.max_width
    request = replace(OTHER, width=widest, height=multiple, num_frames=5, num_inference_steps=1)
    assert model.generate(request).shape == (5, multiple, widest, 3)
    with pytest.raises(RuntimeError):
        model.pipeline(
            prompt="",
            width=widest + multiple,
            height=multiple,
            num_frames=5,
            num_inference_steps=1,
            output_type="latent",
        )


@pytest.mark.parametrize(
    ("changes", "parameter"),
    [
        ({"num_frames": 6}, "num_frames"),
        ({"num_frames": 1}, "num_frames"),
        ({"num_frames": DEFAULT_MAX_FRAMES + 4}, "num_frames"),
        ({"width": 40}, "width"),
        ({"width": 0}, "width"),
        ({"height": 24}, "height"),
        ({"height": 1024}, "height"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"seed": -1}, "seed"),
        ({"image": first_frame()}, "image"),
    ],
)
def test_check_refuses_what_the_model_cannot_run_naming_the_parameter(model, changes, parameter):
    request = replace(REQUEST, **changes)
    with pytest.raises(ValueError, match=parameter):
        model.check(request)
    steps = []
    with pytest.raises(ValueError, match=parameter):
        model.generate(request, on_step=lambda *step: steps.append(step))
    assert steps == []


def test_image_to_video_needs_an_image_of_the_videos_size(i2v_model):
    with pytest.raises(ValueError, match="image"):
        i2v_model.check(REQUEST)
    with pytest.raises(ValueError, match="image"):
        i2v_model.check(replace(REQUEST, image=first_frame(32, 32)))
    with pytest.raises(ValueError, match="image"):
        i2v_model.check(replace(REQUEST, image=first_frame().astype(np.float32)))
    i2v_model.check(replace(REQUEST, image=first_frame()))


def test_image_to_video_is_what_the_pipeline_makes_from_the_same_image(i2v_model):
    import PIL.Image

    request = replace(REQUEST, image=first_frame())
    frames = i2v_model.generate(request)
    assert frames.shape == (5, 32, 48, 3)
    direct = i2v_model.pipeline(
        image=PIL.Image.fromarray(request.image),
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=request.width,
        height=request.height,
        num_frames=request.num_frames,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="np",
    ).frames[0]
    assert np.abs(frames.astype(int) - to_uint8(direct)).max() <= 1
    # The image conditions the clip.
    other = i2v_model.generate(replace(request, image=first_frame(seed=1)))
    assert not np.array_equal(other, frames)


def test_a_half_precision_model_keeps_its_vae_in_float32():
    """As Wan's own examples load it: decoding in bfloat16 bands colours."""
    model = VideoModel.load("embedded:tiny-wan", dtype="bfloat16")
    assert model.pipeline.transformer.dtype == torch.bfloat16
    assert model.pipeline.text_encoder.dtype == torch.bfloat16
    assert model.pipeline.vae.dtype == torch.float32
    assert model.generate(REQUEST).shape == (5, 32, 48, 3)


def test_a_pipeline_that_makes_images_is_refused():
    from deployments.generator.model.embedded import build_embedded_pipeline

    with pytest.raises(ValueError, match="not a video pipeline"):
        VideoModel(build_embedded_pipeline("tiny-sd3"))
