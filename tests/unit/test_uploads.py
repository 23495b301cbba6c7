"""The upload helpers of edits: decoding, sizes, masks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deployments.ingress.uploads import UploadError, decode_image, image_pixels, mask_pixels
from deployments.sizes import fit_size


def encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((64, 32), (64, 32)),  # fits: kept
        ((70, 35), (64, 32)),  # rounded down to multiples
        ((10, 10), (16, 16)),  # never below one multiple
        ((1024, 512), (176, 80)),  # scaled into 128x128 pixels, aspect kept
        ((512, 2048), (64, 256)),
    ],
)
def test_fit_size_keeps_the_aspect_within_the_limits(size, expected):
    width, height = fit_size(*size, multiple=16, max_pixels=128 * 128)
    assert (width, height) == expected
    assert width % 16 == 0 and height % 16 == 0 and width * height <= 128 * 128


def test_decode_reads_png_jpeg_and_webp():
    for format in ("PNG", "JPEG", "WEBP"):
        image = decode_image(encoded(Image.new("RGB", (8, 4)), format), "image", 100)
        assert image.size == (8, 4)


def test_decode_rejects_what_is_not_an_image_or_too_large():
    with pytest.raises(UploadError, match="not an image") as caught:
        decode_image(b"GIF89a-but-not-really", "mask", 100)
    assert caught.value.param == "mask"
    with pytest.raises(UploadError, match="20x20"):
        decode_image(encoded(Image.new("RGB", (20, 20))), "image", 100)
    noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    truncated = encoded(Image.fromarray(noise))[:-60]  # cut inside the pixel data
    with pytest.raises(UploadError, match="not an image"):
        decode_image(truncated, "image", 100)


def test_image_pixels_are_rgb_at_the_output_size():
    pixels = image_pixels(Image.new("RGBA", (10, 5), (1, 2, 3, 0)), 20, 10)
    assert pixels.shape == (10, 20, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[0, 0]) == (1, 2, 3)


def test_masks_redraw_transparent_or_white():
    alpha = Image.new("RGBA", (4, 2), (9, 9, 9, 255))
    alpha.putpixel((0, 0), (9, 9, 9, 0))
    redraw = mask_pixels(alpha, 4, 2)
    assert redraw[0, 0] == 255 and redraw[1, 1] == 0
    gray = Image.new("L", (4, 2), 0)
    gray.putpixel((3, 1), 255)
    redraw = mask_pixels(gray, 8, 4)
    assert redraw.shape == (4, 8) and redraw[3, 7] == 255 and redraw[0, 0] == 0
