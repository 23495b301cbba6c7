"""Reading the images and masks uploaded to `POST /v1/images/edits`, as plain helpers.

An edit redraws an input image (image-to-image) or the masked part of it (inpainting). The
input is scaled to the output size here, on the ingress, so the generator receives pixels
that its pipeline takes as they are. A model conditioned on reference images (FLUX.2) takes
one or several instead, each keeping its own shape: scaled down to at most the output's
area, its sides cut to the model's size multiple, as its pipeline would cut them.

Masks follow OpenAI's convention when they have an alpha channel (fully transparent =
redraw) and diffusers' otherwise (white = redraw).

Only PNG, JPEG and WebP are decoded: every other format Pillow knows is code that parses
untrusted bytes for no user's benefit. An upload is read from the form parser's spooled file
(in memory up to 1 MiB, on disk beyond) rather than copied into `bytes` first.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from deployments.jobs import ModelCapabilities

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
class ReferenceRules:
    """What a model takes as a reference image (`ModelCapabilities`): sides that are
    multiples of `multiple` and at least `min_side`, at most `max_aspect`:1 (None: any)."""

    multiple: int
    min_side: int = 1
    max_aspect: float | None = None

    @classmethod
    def of(cls, capabilities: ModelCapabilities) -> ReferenceRules | None:
        """The model's rules, or None for a model whose edits take no references."""
        if not capabilities.reference_images:
            return None
        return cls(
            capabilities.size_multiple,
            capabilities.reference_min_side,
            capabilities.reference_max_aspect,
        )


def reference_pixels(image: Image.Image, max_area: int, rules: ReferenceRules) -> np.ndarray:
    """A reference image as RGB uint8 (h, w, 3): its own shape, scaled down to at most
    `max_area` pixels (up only as far as the model's smallest side), each side cut down to
    a multiple of `rules.multiple`. One more oblong than the model takes is an
    `UploadError`: cropping it would drop what the client sent it for."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    if rules.max_aspect is not None and max(width, height) > rules.max_aspect * min(width, height):
        raise UploadError(
            "image",
            f"A {width}x{height} image is more oblong than this model takes as a reference "
            f"(at most {rules.max_aspect:g}:1).",
        )
    multiple = rules.multiple
    smallest = -(-max(rules.min_side, multiple) // multiple) * multiple  # rounded up
    scale = min(1.0, (max_area / (width * height)) ** 0.5)
    scale = max(scale, smallest / min(width, height))
    size = [max(smallest, int(side * scale) // multiple * multiple) for side in (width, height)]
    if rules.max_aspect is not None:  # rounding may have stretched it past the bound
        short = min(size)
        size = [min(side, int(short * rules.max_aspect) // multiple * multiple) for side in size]
    if tuple(size) != rgb.size:
        rgb = rgb.resize(tuple(size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


@dataclass(frozen=True)
class EditInputs:
    """An edit's uploads, decoded: its image (and mask) scaled to the output size, or its
    references (`reference_pixels`)."""

    image: np.ndarray | None
    mask: np.ndarray | None
    # The (first) uploaded image's own size, which `size: auto` follows.
    input_size: tuple[int, int]
    references: tuple[np.ndarray, ...] = ()


def read_edit_inputs(
    image_files: Sequence[bytes | BinaryIO],
    mask_file: bytes | BinaryIO | None,
    max_input_pixels: int,
    output_size: Callable[[tuple[int, int]], tuple[int, int]],
    references: ReferenceRules | None = None,
) -> EditInputs:
    """Decode the uploads and scale them to `output_size(first image's size)` (in a worker
    thread: decoding and scaling a large photo takes a while). Sizes are those of the
    upright images, so a phone photo taken in portrait is edited in portrait. With
    `references` (the model's rules for them), the images are references instead.

    Upload files are closed once decoded: a spooled upload can hold many megabytes of disk
    (or of memory, where /tmp is a tmpfs) that the generation that follows does not need.
    """
    if references is not None and mask_file is not None:
        raise ValueError("a reference edit has no mask (inpainting is its own task)")
    try:
        image = decode_image(image_files[0], "image", max_input_pixels)
        width, height = output_size(image.size)
        if references is not None:
            # One at a time, each shrunk before the next is decoded: sixteen photos held
            # decoded at once would take a gigabyte.
            pixels = [reference_pixels(image, width * height, references)]
            for file in image_files[1:]:
                decoded = decode_image(file, "image", max_input_pixels)
                pixels.append(reference_pixels(decoded, width * height, references))
            return EditInputs(
                image=None, mask=None, input_size=image.size, references=tuple(pixels)
            )
        mask = None
        if mask_file is not None:
            mask = decode_image(mask_file, "mask", max_input_pixels)
    finally:
        for upload in (*image_files, mask_file):
            if upload is not None and not isinstance(upload, bytes):
                upload.close()
    if mask is not None and mask.size != image.size:
        raise UploadError(
            "mask",
            f"The mask is {mask.size[0]}x{mask.size[1]}; it must be the image's size, "
            f"{image.size[0]}x{image.size[1]}.",
        )
    return EditInputs(
        image=image_pixels(image, width, height),
        mask=mask_pixels(mask, width, height) if mask is not None else None,
        input_size=image.size,
    )
