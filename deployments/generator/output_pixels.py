"""The pipeline's output as the service returns it: uint8 pixels, rounded one way everywhere."""

from __future__ import annotations

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output in [0, 1] floats to uint8, rounding the same way on every path (the
    request-level engine's calls and the continuous loop's decodes)."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
