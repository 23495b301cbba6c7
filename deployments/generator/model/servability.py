"""What a replica refuses to start with: a pipeline that cannot serve text-to-image requests.

Every model serves `POST /v1/images/generations`, so its loaded pipeline must take a prompt
and make an image from it. Three configs load (or fail to load) and then could answer
nothing but errors, so the replica refuses to start instead, naming the config key, and the
deploy fails visibly:

- an unconditional pipeline (DDPM and the like: no `prompt`);
- an image-to-image, inpainting or edit class named as `pipeline_class` (it needs an input
  image on every call; the family's text-to-image class serves edits as well);
- a `pipeline_class` that does not match the checkpoint (diffusers' own error names
  components, not the key to change).
"""

from __future__ import annotations

import inspect
import logging
import re

from diffusers import DiffusionPipeline
from diffusers.pipelines.auto_pipeline import (
    AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    AUTO_INPAINT_PIPELINES_MAPPING,
    AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
)

from deployments.config.model_config import ModelConfig

logger = logging.getLogger("ray.serve")

# Class names of pipelines that need an input image (or video) on every call.
_NEEDS_AN_INPUT = re.compile(r"(Img2Img|Image2Image|ImageToImage|Inpaint|Edit|Upscale|ControlNet)")


class NotServable(ValueError):
    """The model's pipeline cannot serve text-to-image requests; the message names the key."""


def check_servable(model: ModelConfig, pipeline: DiffusionPipeline) -> None:
    """Raise `NotServable` if `pipeline` cannot make an image from a prompt alone."""
    cls = type(pipeline)
    parameters = inspect.signature(cls.__call__).parameters
    if "prompt" not in parameters:
        raise NotServable(
            f"model {model.id!r}: models[].source {model.source!r} is a {cls.__name__}, which "
            "takes no prompt (an unconditional pipeline): it cannot serve text-to-image "
            "requests; serve a text-to-image checkpoint"
        )
    if _needs_an_input(cls, parameters):
        sibling = text_to_image_sibling(cls)
        instead = f"name {sibling.__name__}, " if sibling is not None else ""
        raise NotServable(
            f"model {model.id!r}: models[].pipeline_class {cls.__name__} needs an input image "
            f"on every call: it cannot serve text-to-image requests; {instead}the family's "
            "text-to-image class (it serves edits too), or leave pipeline_class unset"
        )


def _needs_an_input(cls: type, parameters: dict[str, inspect.Parameter]) -> bool:
    if cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values():
        return False
    required = [
        name
        for name, parameter in parameters.items()
        if name != "self"
        and parameter.default is inspect.Parameter.empty
        and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    edits = [*AUTO_IMAGE2IMAGE_PIPELINES_MAPPING.values(), *AUTO_INPAINT_PIPELINES_MAPPING.values()]
    return bool(required) or cls in edits or _NEEDS_AN_INPUT.search(cls.__name__) is not None


def text_to_image_sibling(cls: type) -> type | None:
    """The text-to-image class of the family whose edit class `cls` is, if diffusers says."""
    for mapping in (AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, AUTO_INPAINT_PIPELINES_MAPPING):
        for family, edit_class in mapping.items():
            if edit_class is cls and family in AUTO_TEXT2IMAGE_PIPELINES_MAPPING:
                return AUTO_TEXT2IMAGE_PIPELINES_MAPPING[family]
    return None


def not_matching(model: ModelConfig, error: ValueError) -> NotServable:
    """diffusers' refusal to load a checkpoint as `pipeline_class` (it lists components),
    naming the key instead."""
    logger.warning("model %r: diffusers refused the checkpoint: %s", model.id, error)
    return NotServable(
        f"model {model.id!r}: models[].pipeline_class {model.pipeline_class} does not match "
        f"the checkpoint at models[].source {model.source!r} (its components are another "
        "family's); name the checkpoint's class, or leave pipeline_class unset"
    )
