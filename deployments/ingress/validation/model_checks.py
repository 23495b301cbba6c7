"""Checks of a validated request against what its model's loaded pipeline reported: a
parameter the pipeline would ignore, a task it has no pipeline for, an edit left with no
step to run, and text that no tokenizer can take. Each is a 400 that names the parameter."""

from __future__ import annotations

from deployments.config.model_config import ModelConfig
from deployments.ingress.errors import invalid_request
from deployments.ingress.protocol import ImageRequest
from deployments.jobs import OPTIONAL_PARAMETERS, ModelCapabilities, Task


def unencodable_field(value: object) -> str | None:
    """The path (`prompt`, `lora.0.name`) of the first string in a parsed JSON body or form
    that is not valid Unicode text (a lone UTF-16 surrogate such as `"\\ud800"`, which JSON
    allows and UTF-8 cannot encode), or None; `body` when a key itself is not text.

    Walks with an explicit stack, not recursion: a body may nest as deep as the JSON parser
    allows, and must not exhaust Python's stack here."""
    pending: list[tuple[object, str]] = [(value, "")]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            if not _is_text(item):
                return path or "body"
        elif isinstance(item, dict):
            if not all(_is_text(str(key)) for key in item):
                return "body"  # the key itself cannot be written back in an error message
            children = [
                (child, f"{path}.{key}" if path else str(key)) for key, child in item.items()
            ]
            pending.extend(reversed(children))
        elif isinstance(item, list):
            children = [(child, f"{path}.{i}" if path else str(i)) for i, child in enumerate(item)]
            pending.extend(reversed(children))
    return None


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def refuse_unencodable(fields: object) -> None:
    """400 for text that cannot be encoded as UTF-8: it would fail inside the pipeline's
    tokenizer (and its batch with it), or in writing the error message that quotes it."""
    if (param := unencodable_field(fields)) is not None:
        raise invalid_request(
            f"Invalid value for '{param}': it is not valid Unicode text (a lone surrogate).",
            param=None if param == "body" else param,
            code="invalid_value",
        )


def check_edit_steps(
    params: ImageRequest, capabilities: ModelCapabilities, model: ModelConfig, task: Task
) -> None:
    """400 for an edit whose steps x strength leave its pipeline no denoising step to run
    (SDXL's run int(steps x strength) steps and fail with none)."""
    strength = params.edit_strength(model)
    if strength is None or "strength" not in capabilities.tasks.get(task, ()):
        return
    steps = params.num_inference_steps or model.default_steps
    if capabilities.edit_steps(task, steps, strength) >= 1:
        return
    param = "strength" if getattr(params, "strength", None) is not None else "num_inference_steps"
    raise invalid_request(
        f"Invalid value for '{param}': {steps} steps at strength {strength:g} leave this "
        "model no denoising step to run; ask for more steps or a higher strength.",
        param=param,
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
