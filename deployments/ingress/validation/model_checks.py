"""Checks of a validated request against what its model's loaded pipeline reported: a
parameter the pipeline would ignore, a task it has no pipeline for, an edit left with no
step to run. Each is a 400 that names the parameter."""

from __future__ import annotations

from deployments.config.model_config import ModelConfig
from deployments.ingress.errors import invalid_request
from deployments.ingress.protocol import ImageRequest
from deployments.jobs import OPTIONAL_PARAMETERS, ModelCapabilities, Task


def check_edit_steps(
    params: ImageRequest, capabilities: ModelCapabilities, model: ModelConfig, task: Task
) -> None:
    """400 for an edit whose steps x strength leave its pipeline no denoising step to run
    (SDXL's run int(steps x strength) steps and fail with none)."""
    strength = params.edit_strength(model)
    if strength is None or "strength" not in capabilities.tasks.get(task, ()):
        return
    steps = params.steps(model)
    if capabilities.edit_steps(task, steps, strength) >= 1:
        return
    param = "strength" if getattr(params, "strength", None) is not None else "num_inference_steps"
    raise invalid_request(
        f"Invalid value for '{param}': {steps} steps at strength {strength:g} leave this "
        "model no denoising step to run; ask for more steps or a higher strength.",
        param=param,
        code="invalid_value",
    )


def check_input_images(
    count: int, capabilities: ModelCapabilities, model: ModelConfig, task: Task
) -> None:
    """400 naming `image` for an edit of more images than the model takes: one, unless it
    is conditioned on references (`ModelCapabilities.reference_images`); a masked edit
    (inpainting) redraws one image."""
    most = max(1, capabilities.reference_images) if task == "image-to-image" else 1
    if count <= most:
        return
    pipeline = capabilities.pipeline_class
    if task == "inpaint":
        why = "an edit with a mask takes one image"
    elif most == 1:
        why = f"the model '{model.id}' ({pipeline}) edits one image at a time"
    else:
        why = f"the model '{model.id}' ({pipeline}) takes at most {most} reference images"
    raise invalid_request(
        f"Invalid value for 'image': {count} images were sent; {why}.",
        param="image",
        code="invalid_value",
    )


def check_supported(
    params: ImageRequest, capabilities: ModelCapabilities, model: ModelConfig, task: Task
) -> None:
    """400 naming the parameter if the model's pipeline cannot do what the request asks (a
    parameter it would silently ignore, or a task its family has no pipeline for)."""
    pipeline = capabilities.pipeline_class
    if task not in capabilities.tasks:
        what = "inpaint (no mask is supported)" if task == "inpaint" else "edit images"
        raise invalid_request(
            f"The model '{model.id}' ({pipeline}) cannot {what}.",
            param="mask" if task == "inpaint" else "image",
            code="unsupported_parameter",
        )
    takes = capabilities.tasks[task]
    for name in OPTIONAL_PARAMETERS:
        if getattr(params, name, None) is not None and name not in takes:
            raise invalid_request(
                f"The model '{model.id}' ({pipeline}) does not take '{name}'.",
                param=name,
                code="unsupported_parameter",
            )
    if getattr(params, "partial_images", 0) and not capabilities.previews:
        raise invalid_request(
            f"The model '{model.id}' ({pipeline}) cannot preview its images; ask for "
            "'partial_images': 0.",
            param="partial_images",
            code="unsupported_parameter",
        )
