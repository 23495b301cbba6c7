"""The upload helpers of edits: decoding, sizes, masks."""

from __future__ import annotations

import io
import struct
import tempfile
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from deployments.ingress.uploads import (
    UploadError,
    decode_image,
    image_pixels,
    mask_pixels,
    read_edit_inputs,
)
from deployments.sizes import fit_size

# Formats Pillow reads (and writes, for the test) that edits must refuse all the same.
OTHER_FORMATS = ("TIFF", "BMP", "GIF", "ICO", "PPM", "TGA", "DDS", "QOI")
RED, BLUE = (220, 20, 20), (20, 20, 220)


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size (with valid CRCs) and has no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def sideways_photo() -> bytes:
    """A JPEG stored 64x32, left half red, whose EXIF says: rotate 90 degrees clockwise
    (orientation 6, what phones write for a portrait photo)."""
    image = Image.new("RGB", (64, 32), BLUE)
    image.paste(RED, (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", exif=exif, quality=95)


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


@pytest.mark.parametrize("format", OTHER_FORMATS)
def test_only_png_jpeg_and_webp_are_decoded(format):
    data = encoded(Image.new("RGB", (8, 4), RED), format)
    assert Image.open(io.BytesIO(data)).format == format  # Pillow itself would read it
    with pytest.raises(UploadError, match=r"PNG, JPEG or WebP") as caught:
        decode_image(data, "mask", 100)
    assert caught.value.param == "mask"


def test_a_header_declaring_a_huge_image_is_refused_before_any_pixel():
    # 30000x30000 is past Pillow's own decompression-bomb bound, which raises on opening.
    with pytest.raises(UploadError, match="too large") as caught:
        decode_image(png_header_only(30000, 30000), "image", 4096 * 4096)
    assert caught.value.param == "image"
    with pytest.raises(UploadError, match="5000x5000"):
        decode_image(png_header_only(5000, 5000), "image", 4096 * 4096)


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_refused(format):
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noise), format)
    # (A PNG cut after its last pixel data, in its end marker, is whole: not one of these.)
    for length in (1, 8, 20, 40, len(data) // 2, len(data) - 30):
        with pytest.raises(UploadError, match="not an image"):
            decode_image(data[:length], "image", 64 * 64)


def _samples() -> list[bytes]:
    noise = np.random.default_rng(2).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba = Image.fromarray(noise, "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 8
    return [
        encoded(rgba, "PNG"),
        encoded(rgba.convert("P"), "PNG"),
        encoded(rgba.convert("RGB"), "JPEG", exif=exif),
        encoded(rgba.convert("RGB"), "JPEG", progressive=True),
        encoded(rgba, "WEBP"),
        encoded(rgba, "WEBP", lossless=True),
    ]


SAMPLES = _samples()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid PNG, JPEG or WebP with bytes flipped, cut off or inserted: often in the
    headers, where a parser decides what to read next."""
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, min(63, len(data))) | st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "truncate", "insert"]))
        if kind == "flip" and position < len(data):
            data[position] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[position:]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns of corrupt EXIF, rightly
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_images())
def test_a_mangled_upload_is_an_image_or_an_upload_error_never_a_crash(data):
    try:
        image = decode_image(data, "image", 64 * 64)
    except UploadError as error:
        assert error.param == "image"
    else:
        assert image.width * image.height <= 64 * 64


def test_exif_orientation_is_applied_before_sizes_are_known():
    image = decode_image(sideways_photo(), "image", 100_000)
    assert image.size == (32, 64)  # as a viewer shows it, not as stored
    pixels = image_pixels(image, 32, 64)
    # The stored left half is the top once turned clockwise.
    assert np.abs(pixels[:28].astype(int) - RED).max() < 40
    assert np.abs(pixels[36:].astype(int) - BLUE).max() < 40


def test_a_mask_of_the_displayed_size_fits_a_sideways_photo():
    mask = encoded(Image.new("L", (32, 64), 255))
    inputs = read_edit_inputs([sideways_photo()], mask, 100_000, lambda size: size)
    assert inputs.input_size == (32, 64)
    assert inputs.image.shape == (64, 32, 3) and inputs.mask.shape == (64, 32)
    stored_size = encoded(Image.new("L", (64, 32), 255))
    with pytest.raises(UploadError, match="must be the image's size") as caught:
        read_edit_inputs([sideways_photo()], stored_size, 100_000, lambda size: size)
    assert caught.value.param == "mask"


def test_uploads_are_read_from_the_parsers_spooled_files():
    data = encoded(Image.new("RGB", (64, 32), RED))
    with tempfile.SpooledTemporaryFile(max_size=16) as spooled:  # rolled over to disk
        spooled.write(data)
        image = decode_image(spooled, "image", 100_000)
        assert image.size == (64, 32) and image.getpixel((0, 0)) == RED
    with tempfile.SpooledTemporaryFile() as empty, pytest.raises(UploadError, match="empty"):
        decode_image(empty, "image", 100)


def test_upload_files_are_released_once_decoded():
    with (
        tempfile.SpooledTemporaryFile(max_size=16) as image,
        tempfile.SpooledTemporaryFile(max_size=16) as mask,
        tempfile.SpooledTemporaryFile() as broken,
    ):
        for file in (image, mask):
            file.write(encoded(Image.new("RGB", (8, 4), RED)))
        inputs = read_edit_inputs([image], mask, 100, lambda size: (16, 8))
        assert inputs.image.shape == (8, 16, 3)
        assert image.closed and mask.closed  # not held through the generation
        broken.write(b"not an image")
        with pytest.raises(UploadError):
            read_edit_inputs([broken], None, 100, lambda size: size)
        assert broken.closed
