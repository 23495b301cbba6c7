"""Reading the images and masks uploaded to `POST /v1/images/edits`, as plain helpers.

An edit redraws an input image (image-to-image) or the masked part of it (inpainting). The
input is scaled to the output size here, on the ingress, so the generator receives pixels
that its pipeline takes as they are. Masks follow OpenAI's convention when they have an
alpha channel (fully transparent = redraw) and diffusers' otherwise (white = redraw).

Only PNG, JPEG and WebP are decoded: every other format Pillow knows is code that parses
untrusted bytes for no user's benefit. An upload is read from the form parser's spooled file
(in memory up to 1 MiB, on disk beyond) rather than copied into `bytes` first.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# The formats OpenAI's edits accept, as Pillow names them (its JPEG plugin also opens MPO,
# the multi-picture JPEG of some cameras).
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")


class UploadError(ValueError):
    """An uploaded file that cannot be used; `param` names the form field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def decode_image(data: bytes | BinaryIO, param: str, max_pixels: int) -> Image.Image:
    """The uploaded image, fully decoded and turned upright (its EXIF orientation applied);
    at most `max_pixels` (width x height) large.

    Every failure is an `UploadError` naming `param`: whatever Pillow raises on a hostile or
    broken file (and its decoders raise nearly anything) is the client's error, not ours.
    """
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    file.seek(0, io.SEEK_END)
    if file.tell() == 0:
        raise UploadError(param, f"The '{param}' file is empty.")
    file.seek(0)
    try:
        image = Image.open(file, formats=UPLOAD_FORMATS)
        width, height = image.size  # read from the header, before any pixel is decoded
        if width * height > max_pixels:
            raise UploadError(
                param,
                f"The '{param}' image is {width}x{height}; the largest accepted has "
                f"{max_pixels} pixels.",
            )
        image.load()
        # In place: no copy of the pixels when the image is already upright.
        ImageOps.exif_transpose(image, in_place=True)
    except UploadError:
        raise
    except Image.DecompressionBombError:
        # Pillow's own bound, checked on opening, before ours: a header claiming a huge size.
        raise UploadError(
            param,
            f"The '{param}' image is too large; the largest accepted has {max_pixels} pixels.",
        ) from None
    except Exception:  # broad on purpose: see the docstring
        raise UploadError(
            param, f"The '{param}' file is not an image we can read (PNG, JPEG or WebP)."
        ) from None
    return image


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


@dataclass(frozen=True)
class EditInputs:
    """An edit's uploads, decoded and scaled to the output size."""

    image: np.ndarray
    mask: np.ndarray | None
    # The uploaded image's own size, which `size: auto` follows.
    input_size: tuple[int, int]


def read_edit_inputs(
    image_file: bytes | BinaryIO,
    mask_file: bytes | BinaryIO | None,
    max_input_pixels: int,
    output_size: Callable[[tuple[int, int]], tuple[int, int]],
) -> EditInputs:
    """Decode the uploads and scale them to `output_size(input size)` (in a worker thread:
    decoding and scaling a large photo takes a while). Sizes are those of the upright
    images, so a phone photo taken in portrait is edited in portrait.

    Upload files are closed once decoded: a spooled upload can hold many megabytes of disk
    (or of memory, where /tmp is a tmpfs) that the generation that follows does not need.
    """
    try:
        image = decode_image(image_file, "image", max_input_pixels)
        mask = None
        if mask_file is not None:
            mask = decode_image(mask_file, "mask", max_input_pixels)
    finally:
        for upload in (image_file, mask_file):
            if upload is not None and not isinstance(upload, bytes):
                upload.close()
    if mask is not None and mask.size != image.size:
        raise UploadError(
            "mask",
            f"The mask is {mask.size[0]}x{mask.size[1]}; it must be the image's size, "
            f"{image.size[0]}x{image.size[1]}.",
        )
    width, height = output_size(image.size)
    return EditInputs(
        image=image_pixels(image, width, height),
        mask=mask_pixels(mask, width, height) if mask is not None else None,
        input_size=image.size,
    )
