"""Encoding generated images (uint8 HxWx3 arrays) to PNG, JPEG or WebP bytes."""

from __future__ import annotations

import base64
import io
from typing import Literal

import numpy as np
from PIL import Image

OutputFormat = Literal["png", "jpeg", "webp"]


def encode_image(pixels: np.ndarray, output_format: OutputFormat, compression: int = 100) -> bytes:
    """Encode an RGB uint8 array of shape (H, W, 3).

    `compression` is OpenAI's `output_compression` (0-100, default 100): it is the quality of
    the lossy formats, so 100 keeps the most detail and lower values give smaller files.
    PNG is lossless and ignores it.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(
            f"expected a uint8 array of shape (H, W, 3), got {pixels.dtype} {pixels.shape}"
        )
    image = Image.fromarray(pixels, mode="RGB")
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=max(1, compression))
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=compression)
    else:
        raise ValueError(f"unsupported output format {output_format!r}")
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def upscale(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an RGB uint8 array to (height, width, 3), smoothly (for small previews)."""
    image = Image.fromarray(pixels, mode="RGB").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)
