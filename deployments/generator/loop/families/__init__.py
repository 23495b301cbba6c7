"""The flow-matching families the continuous loop runs, one module each: `flow_family.py` (an
image's state and the interface), `sd3.py`, `flux.py` (FLUX and Chroma), `z_image.py`.
Adding a family is adding its module and a line to `family_of`."""

from __future__ import annotations

from diffusers import (
    ChromaPipeline,
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    ZImagePipeline,
)

from deployments.generator.loop.families.flow_family import FlowFamily, ImagePrompt, ImageState
from deployments.generator.loop.families.flux import ChromaFamily, FluxFamily
from deployments.generator.loop.families.sd3 import SD3Family
from deployments.generator.loop.families.z_image import ZImageFamily

__all__ = ["FlowFamily", "ImagePrompt", "ImageState", "family_of"]


def family_of(view: DiffusionPipeline) -> FlowFamily | None:
    """The step arithmetic for the view's pipeline class, or None where the continuous loop
    does not run it (SDXL and other UNet families, true-CFG families, edits: their requests
    run per call). The class must be the family's own, not a subclass that may change
    its `__call__`."""
    if type(view) is StableDiffusion3Pipeline:
        return SD3Family(view)
    if type(view) is FluxPipeline and view.transformer.config.guidance_embeds:
        # A FLUX without a guidance embedding is guided by "true" CFG (`true_cfg_scale`, its
        # negative prompt in a second forward), which the loop does not run: it runs per call.
        return FluxFamily(view)
    if type(view) is ChromaPipeline:
        return ChromaFamily(view)
    if type(view) is ZImagePipeline:
        return ZImageFamily(view)
    return None
