"""A batch's pipeline arguments and the timing of its call, without a model."""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

from deployments.generator.calls.call_arguments import pipeline_arguments
from deployments.generator.calls.call_timing import CallTimer
from deployments.generator.model.pipelines import call_parameters
from deployments.jobs import GenerationJob
from tests.jobs import make_job

EVERYTHING = frozenset(
    {
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "generator",
        "output_type",
        "callback_on_step_end",
        "image",
        "strength",
        "mask_image",
    }
)


def on_step_end(pipeline, step, timestep, callback_kwargs):
    return callback_kwargs


def job(seeds: tuple[int, ...], prompt: str = "p", **fields) -> GenerationJob:
    values = {"height": 32, "num_inference_steps": 4, "guidance_scale": 5.0}
    return make_job(prompt=prompt, seeds=seeds, **{**values, **fields})


def edit_job(seeds: tuple[int, ...], grey: int, *, masked: bool = False) -> GenerationJob:
    image = np.full((32, 64, 3), grey, dtype=np.uint8)
    mask = np.full((32, 64), 255, dtype=np.uint8) if masked else None
    return job(seeds, image=image, mask=mask, strength=0.6)


def test_prompts_are_per_image_and_shared_parameters_come_from_the_batch():
    jobs = [job((1, 2), "a", negative_prompt="x"), job((3,), "b", negative_prompt="y")]
    arguments = pipeline_arguments(jobs, EVERYTHING, on_step_end)
    assert arguments["prompt"] == ["a", "a", "b"]
    assert arguments["negative_prompt"] == ["x", "x", "y"]
    assert (arguments["width"], arguments["height"]) == (64, 32)
    assert arguments["num_inference_steps"] == 4
    assert arguments["guidance_scale"] == 5.0
    assert arguments["output_type"] == "np"
    assert arguments["callback_on_step_end"] is on_step_end
    assert {"image", "strength", "mask_image"}.isdisjoint(arguments)


def test_no_negative_prompt_leaves_the_pipelines_own_default():
    """Not None, not empty strings: nothing, so the pipeline's own default stands (Sana's is
    "", and None fails its text cleaning)."""
    arguments = pipeline_arguments([job((1,)), job((2,))], EVERYTHING, on_step_end)
    assert "negative_prompt" not in arguments
    assert all(value is not None for value in arguments.values())


def test_each_image_gets_its_own_cpu_generator_seeded_with_its_seed():
    arguments = pipeline_arguments([job((7, 8)), job((9,))], EVERYTHING, on_step_end)
    generators = arguments["generator"]
    assert [g.initial_seed() for g in generators] == [7, 8, 9]
    assert {g.device.type for g in generators} == {"cpu"}
    assert len({id(g) for g in generators}) == 3
    # The same seed draws the same noise, whatever else is in the batch.
    alone = pipeline_arguments([job((9,))], EVERYTHING, on_step_end)["generator"][0]
    noise = torch.randn((2, 3), generator=generators[2])
    assert torch.equal(noise, torch.randn((2, 3), generator=alone))


def test_an_edit_repeats_each_jobs_input_image_for_each_of_its_seeds():
    jobs = [edit_job((1, 2), grey=10), edit_job((3,), grey=200)]
    arguments = pipeline_arguments(jobs, EVERYTHING, on_step_end)
    images = arguments["image"]
    assert all(isinstance(image, PIL.Image.Image) for image in images)
    assert [image.size for image in images] == [(64, 32)] * 3
    assert [image.getpixel((0, 0)) for image in images] == [(10, 10, 10)] * 2 + [(200,) * 3]
    assert arguments["strength"] == 0.6
    assert "mask_image" not in arguments


def test_an_inpainting_batch_has_a_mask_per_image():
    jobs = [edit_job((1, 2), grey=10, masked=True), edit_job((3,), grey=20, masked=True)]
    masks = pipeline_arguments(jobs, EVERYTHING, on_step_end)["mask_image"]
    assert [(mask.mode, mask.size) for mask in masks] == [("L", (64, 32))] * 3


def test_only_what_the_pipeline_takes_is_passed():
    takes = EVERYTHING - {"negative_prompt", "width", "height"}
    arguments = pipeline_arguments([job((1,), negative_prompt="x")], takes, on_step_end)
    assert set(arguments) == takes - {"image", "strength", "mask_image"}


@pytest.mark.parametrize(
    ("pipeline_class", "masked", "left_out"),
    [
        ("StableDiffusion3Pipeline", None, set()),
        ("StableDiffusion3InpaintPipeline", True, set()),
        # SDXL's image-to-image takes its size from the input image.
        ("StableDiffusionXLImg2ImgPipeline", False, {"width", "height"}),
    ],
)
def test_real_pipeline_classes_take_every_argument_they_are_meant_to(
    pipeline_class, masked, left_out
):
    takes = call_parameters(getattr(diffusers, pipeline_class))
    jobs = [job((1,), negative_prompt="x") if masked is None else edit_job((1,), 0, masked=masked)]
    meant = pipeline_arguments(jobs, EVERYTHING, on_step_end)
    assert set(meant) - set(pipeline_arguments(jobs, takes, on_step_end)) == left_out


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_call_is_split_into_encoding_denoising_and_decoding():
    clock = FakeClock()
    clock.now = 10.0
    timer = CallTimer(clock)

    def encode_prompt(prompt: str) -> str:
        clock.now += 2.0  # encoding takes 2 s
        return prompt.upper()

    timed = timer.timed_encode_prompt(encode_prompt)
    clock.now = 11.0
    assert timed("a") == "A"  # 11 -> 13
    for step, ends_at in enumerate((14.0, 16.0, 17.0)):
        clock.now = ends_at
        timer.step_ended(step)
    clock.now = 20.0
    times = timer.finished()
    assert times.started == 10.0
    assert times.generate_s == 10.0
    assert times.text_encode_s == 2.0
    assert times.denoise_s == 4.0  # from the end of encoding to the end of the last step
    assert times.decode_s == 3.0
    assert times.steps == 3


def test_encoding_that_fails_is_still_timed():
    clock = FakeClock()
    timer = CallTimer(clock)

    def encode_prompt() -> None:
        clock.now += 1.5
        raise ValueError("bad prompt")

    with pytest.raises(ValueError):
        timer.timed_encode_prompt(encode_prompt)()
    assert timer.finished().text_encode_s == 1.5
