"""diffusers' caches decided per image in the continuous loop.

A model's `optimizations.cache` hooks one of diffusers' caches into the shared denoiser
(`model/cache_hooks.py`), with its state per pipeline call: one decision for a call's batch,
at the call's step. The loop's forward holds images of different requests at different
steps, so for the kinds built here each image keeps its own cache state (in its
`ImageState.caches`) and decides at its own step: `first_block.py` (First-Block-Cache: the
blocks past the first run only for the images whose first block's residual changed) and
`taylorseer.py` (TaylorSeer: a hooked module runs only for the images at a step that
computes; the others take their Taylor prediction). Hooks of ours sit outside diffusers'
on the same modules and hand request-level calls to them unchanged; the lane tells them a
forward's rows (`loop_rows.rows`). An image from the loop equals its request alone with the
same cache (`tests/pipeline/test_loop_cache.py`); MagCache and Pyramid Attention Broadcast
are not built, and a model with one keeps request-level batches.
"""

from __future__ import annotations

from typing import Any

import torch

from deployments.generator.loop.caches import first_block, taylorseer
from deployments.generator.loop.caches.loop_rows import rows

__all__ = ["PER_IMAGE_KINDS", "has_per_image_caches", "install", "rows"]

PER_IMAGE_KINDS = ("first_block", "taylorseer")
# Marks a denoiser whose cache is decided per image in the loop (an attribute of the module).
_ATTRIBUTE = "_image_service_per_image_caches"


def install(denoiser: torch.nn.Module, kind: str, diffusers_config: Any) -> None:
    """Hook the per-image side of the cache `kind` that diffusers' hooks just put on
    `denoiser` (nothing for the kinds not built here)."""
    if kind == "first_block":
        hooked = first_block.install(denoiser, diffusers_config.threshold)
    elif kind == "taylorseer":
        hooked = taylorseer.install(denoiser)
    else:
        return
    if hooked:
        setattr(denoiser, _ATTRIBUTE, True)


def has_per_image_caches(denoiser: torch.nn.Module | None) -> bool:
    """Whether the loop must tell `denoiser`'s cache hooks the rows of its forwards."""
    return getattr(denoiser, _ATTRIBUTE, False)
