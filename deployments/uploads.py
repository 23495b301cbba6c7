"""Reading the images and masks uploaded to `POST /v1/images/edits`, as plain helpers.

An edit redraws an input image (image-to-image) or the masked part of it (inpainting). The
input is scaled to the output size here, on the ingress, so the generator receives pixels
that its pipeline takes as they are. Masks follow OpenAI's convention when they have an
alpha channel (fully transparent = redraw) and diffusers' otherwise (white = redraw).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError


class UploadError(ValueError):
    """An uploaded file that cannot be used; `param` names the form field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """The uploaded image, fully decoded; at most `max_pixels` (width x height) large."""
    if not data:
        raise UploadError(param, f"The '{param}' file is empty.")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # read from the header, before any pixel is decoded
        if width * height > max_pixels:
            raise UploadError(
                param,
                f"The '{param}' image is {width}x{height}; the largest accepted has "
                f"{max_pixels} pixels.",
            )
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except UploadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombWarning):
        raise UploadError(
            param, f"The '{param}' file is not an image we can read (PNG, JPEG or WebP)."
        ) from None
    return image


def fit_size(width: int, height: int, multiple: int, max_pixels: int) -> tuple[int, int]:
    """The output size for an input of `width` x `height` (`size: auto`): the same aspect,
    scaled down to at most `max_pixels`, each side a multiple of `multiple` (at least one)."""
    scale = min(1.0, (max_pixels / (width * height)) ** 0.5)
    fitted_width = max(multiple, int(width * scale) // multiple * multiple)
    fitted_height = max(multiple, int(height * scale) // multiple * multiple)
    while fitted_width * fitted_height > max_pixels and max(fitted_width, fitted_height) > multiple:
        if fitted_width >= fitted_height:
            fitted_width -= multiple
        else:
            fitted_height -= multiple
    return fitted_width, fitted_height


def image_pixels(image: Image.Image, width: int, height: int) -> np.ndarray:
    """The image as RGB uint8 (height, width, 3), scaled to the output size."""
    rgb = image.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def mask_pixels(mask: Image.Image, width: int, height: int) -> np.ndarray:
    """The mask as uint8 (height, width), 255 where the image is redrawn.

    With an alpha channel (OpenAI's masks): the transparent parts are redrawn. Without one
    (diffusers' masks): the white parts are.
    """
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        redraw = Image.eval(mask.convert("RGBA").getchannel("A"), lambda alpha: 255 - alpha)
    else:
        redraw = mask.convert("L")
    if redraw.size != (width, height):
        redraw = redraw.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(redraw, dtype=np.uint8)
