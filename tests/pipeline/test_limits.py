"""The limits a model reports are the ones its real pipeline has (design note 11).

For each family's embedded model and each task: a request just inside a reported limit
generates, one just outside fails in the pipeline (or would silently make another size), so
an ingress that applies the limits lets through only requests that generate.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from deployments.config.model_config import ModelConfig
from deployments.generator.model.model_limits import check_default_size
from deployments.generator.model.pipelines import RequestPipelines, call_parameters, load_pipeline
from deployments.jobs import ModelCapabilities, Task

TASKS: tuple[Task, ...] = ("text-to-image", "image-to-image", "inpaint")
# What the embedded models are known to take (checked at extreme aspect ratios, 1 step):
# tiny-sd3's positional embedding holds 64 x 64 patches of 2 x 2 latents of 8 x 8 pixels;
# SDXL's UNet and FLUX's rotary embeddings have no such table (2048 x 16 generates).
EXPECTED = {
    "tiny-sd3": (1024, 1024, 16, "ceil"),
    "tiny-sdxl": (None, None, 8, "floor"),
    "tiny-flux": (None, None, 16, "ceil"),
    "tiny-chroma": (None, None, 16, "ceil"),  # FLUX's layout; no inpainting that runs
    # Its image processor's 16-pixel cell already holds the 2x2 patches (not 32).
    "tiny-qwen-image": (None, None, 16, "ceil"),
    # Its rotary tables hold 64 positions a side, a patch of 16 pixels each.
    "tiny-z-image": (1024, 1024, 16, "ceil"),
    # FLUX.2's rotary embeddings have no table either; its 16-pixel cell holds the 2x2
    # patches. Its image-to-image takes references and no strength (only inpainting rounds).
    "tiny-flux2-klein": (None, None, 16, "ceil"),
}


@pytest.fixture(scope="module", params=list(EXPECTED))
def family(request):
    pipeline = load_pipeline(
        ModelConfig(id=request.param, source=f"embedded:{request.param}", device="cpu")
    )
    views = RequestPipelines(pipeline)
    return request.param, views, views.capabilities()


def served(capabilities: ModelCapabilities, task: Task) -> None:
    if task not in capabilities.tasks:
        pytest.skip(f"{capabilities.pipeline_class} serves no {task}")


def generate(
    views: RequestPipelines,
    task: Task,
    width: int,
    height: int,
    steps: int = 1,
    strength: float = 1.0,
    reference: tuple[int, int] = (64, 64),
) -> tuple[tuple[int, ...], int]:
    """The shape of the one image that `task` makes at `width` x `height`, and the denoising
    steps it ran; raises what the pipeline raises. Arguments as the engine passes them (an
    edit's input image is already at the output size; a reference keeps its own,
    `reference`, by default one that FLUX.2's image processor takes)."""
    view = views.view(task)
    takes = call_parameters(type(view))
    ran: list[int] = []

    def count(_pipeline, step: int, _timestep, callback_kwargs: dict) -> dict:
        ran.append(step)
        return callback_kwargs

    arguments = {
        "prompt": ["a lighthouse"],
        "width": width,
        "height": height,
        "num_inference_steps": steps,
        "guidance_scale": 5.0,
        "generator": [torch.Generator("cpu").manual_seed(0)],
        "output_type": "np",
        "callback_on_step_end": count,
    }
    if task != "text-to-image" and "strength" not in takes:  # conditioned on a reference
        arguments["image"] = [PIL.Image.new("RGB", reference, (120, 120, 120))]
    elif task != "text-to-image":
        image = np.full((height, width, 3), 120, dtype=np.uint8)
        arguments.update(image=[PIL.Image.fromarray(image)], strength=strength)
    if task == "inpaint":
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[:, : width // 2] = 255
        arguments["mask_image"] = [PIL.Image.fromarray(mask)]
    images = view(**{name: value for name, value in arguments.items() if name in takes}).images
    return images[0].shape, len(ran)


def makes(views: RequestPipelines, task: Task, width: int, height: int) -> bool:
    """Whether `task` makes an image of exactly `width` x `height`."""
    try:
        shape, _ = generate(views, task, width, height)
    except (ValueError, RuntimeError):
        return False
    return shape == (height, width, 3)


def test_the_capabilities_carry_the_models_own_limits(family):
    name, _, capabilities = family
    max_width, max_height, multiple, rounding = EXPECTED[name]
    assert (capabilities.max_width, capabilities.max_height) == (max_width, max_height)
    assert capabilities.size_multiple == multiple
    # Every edit that takes a strength has its rule (a reference-conditioned one runs every
    # step).
    edits = [task for task, takes in capabilities.tasks.items() if "strength" in takes]
    assert capabilities.edit_step_rounding == dict.fromkeys(edits, rounding)


@pytest.mark.parametrize("task", TASKS)
def test_the_largest_sides_generate_and_one_cell_more_fails(family, task):
    _, views, capabilities = family
    served(capabilities, task)
    multiple = capabilities.size_multiple
    if capabilities.max_width is None:
        # No cap to test against: twice tiny-sd3's cap, at the most extreme aspect ratios.
        assert makes(views, task, 2048, multiple)
        assert makes(views, task, multiple, 2048)
        return
    widest, tallest = capabilities.max_width, capabilities.max_height
    assert makes(views, task, widest, multiple)
    assert makes(views, task, multiple, tallest)
    # SD3's position table refuses by name (ValueError); Z-Image's rotary tables run out
    # (IndexError).
    with pytest.raises((ValueError, IndexError), match=r"pos_embed_max_size|out of bounds"):
        generate(views, task, widest + multiple, multiple)
    with pytest.raises((ValueError, IndexError), match=r"pos_embed_max_size|out of bounds"):
        generate(views, task, multiple, tallest + multiple)


@pytest.mark.parametrize("task", TASKS)
def test_the_smallest_side_is_the_size_multiple(family, task):
    _, views, capabilities = family
    served(capabilities, task)
    multiple = capabilities.size_multiple
    assert makes(views, task, multiple, multiple)
    assert makes(views, task, 3 * multiple, 2 * multiple)
    # Half a cell off: the pipeline fails, or makes another size than was asked.
    for width, height in [(multiple // 2, multiple), (multiple * 3 // 2, multiple)]:
        assert not makes(views, task, width, height)
        assert not makes(views, task, height, width)


def test_references_inside_the_reported_limits_generate_and_past_them_fail(family):
    _, views, capabilities = family
    if not capabilities.reference_images:
        pytest.skip(f"{capabilities.pipeline_class}'s edits start from their image")
    side = capabilities.reference_min_side
    widest = int(side * capabilities.reference_max_aspect)
    for reference in [(side, side), (widest, side), (side, widest)]:
        assert generate(views, "image-to-image", 32, 32, reference=reference)[0] == (32, 32, 3)
    for reference in [(side - 1, side), (side, side - 1), (widest + 1, side), (side, widest + 1)]:
        with pytest.raises(ValueError, match=r"too small|too extreme"):
            generate(views, "image-to-image", 32, 32, reference=reference)


# (num_inference_steps, strength): the two failing SDXL edits first.
EDITS = [(1, 0.8), (4, 0.1), (4, 0.3), (3, 0.25), (1, 0.05), (10, 0.7), (2, 1.0)]


@pytest.mark.parametrize("task", ["image-to-image", "inpaint"])
def test_edits_run_the_steps_the_capabilities_predict(family, task):
    name, views, capabilities = family
    served(capabilities, task)
    if "strength" not in capabilities.tasks[task]:
        # Conditioned on references (FLUX.2): every step runs, whatever strength is sent
        # (the ingress refuses one).
        for steps, strength in EDITS:
            assert generate(views, task, 32, 32, steps=steps, strength=strength)[1] == steps
        return
    for steps, strength in EDITS:
        predicted = capabilities.edit_steps(task, steps, strength)
        if predicted == 0:
            with pytest.raises((ValueError, RuntimeError)):
                generate(views, task, 32, 32, steps=steps, strength=strength)
        else:
            _, ran = generate(views, task, 32, 32, steps=steps, strength=strength)
            assert ran == predicted, (steps, strength)
    # The rule matters: SDXL rounds down to nothing where SD3 and FLUX run a step.
    floors = EXPECTED[name][3] == "floor"
    assert capabilities.edit_steps(task, 4, 0.1) == (0 if floors else 1)


def test_a_task_with_no_known_rule_counts_as_rounding_down():
    capabilities = ModelCapabilities(pipeline_class="Unknown", tasks={})
    assert capabilities.edit_steps("image-to-image", 4, 0.3) == 1
    assert capabilities.edit_steps("image-to-image", 4, 0.2) == 0


def test_a_default_size_the_model_cannot_make_fails_the_start():
    capabilities = ModelCapabilities(
        pipeline_class="StableDiffusion3Pipeline",
        tasks={},
        max_width=512,
        max_height=512,
        size_multiple=16,
    )
    check_default_size(ModelConfig(default_size="512x512"), capabilities)
    with pytest.raises(ValueError, match="default_size 1024x512 does not fit"):
        check_default_size(ModelConfig(default_size="1024x512"), capabilities)
    with pytest.raises(ValueError, match="multiples of 16"):
        check_default_size(ModelConfig(default_size="72x72", size_multiple=8), capabilities)
