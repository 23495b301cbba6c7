"""Names the generator side looks components and dtypes up by, and the form its images
leave in, kept in one place.

A text-to-image pipeline's denoiser (the module every denoising step runs, and the one the
speed levers and caches work on) is its `transformer` (SD3, FLUX) or its `unet` (SDXL).
Configs name dtypes as strings (`dtype: bfloat16`, a TaylorSeer `taylor_factors_dtype`).
Every path returns uint8 pixels rounded one way (`to_uint8`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DENOISER_NAMES = ("transformer", "unet")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def find_denoiser(pipeline: Any) -> torch.nn.Module | None:
    """The pipeline's denoiser, or None if it has neither a transformer nor a unet."""
    for name in DENOISER_NAMES:
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def denoiser_of(pipeline: Any) -> torch.nn.Module:
    """The pipeline's denoiser; a pipeline without one cannot be served, so this raises."""
    denoiser = find_denoiser(pipeline)
    if denoiser is None:
        raise ValueError(f"{type(pipeline).__name__} has no transformer or unet")
    return denoiser


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output in [0, 1] floats to uint8, rounding the same way on every path (the
    request-level calls and the continuous loop's decodes)."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
