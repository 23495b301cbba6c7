import base64
import io

import numpy as np
import pytest
from PIL import Image

from deployments.ingress.encoding import encode_image, to_base64


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_each_format_decodes_to_the_same_size(pixels, fmt, pil_format):
    decoded = Image.open(io.BytesIO(encode_image(pixels, fmt)))
    assert decoded.format == pil_format
    assert decoded.size == (48, 32)
    assert decoded.mode == "RGB"


def test_png_is_lossless(pixels):
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(pixels, "png"))))
    assert np.array_equal(decoded, pixels)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lower_output_compression_gives_smaller_files(pixels, fmt):
    assert len(encode_image(pixels, fmt, 10)) < len(encode_image(pixels, fmt, 100))


def test_zero_compression_still_encodes(pixels):
    Image.open(io.BytesIO(encode_image(pixels, "jpeg", 0))).load()


def test_rejects_arrays_that_are_not_rgb_uint8():
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((8, 8, 3), dtype=np.float32), "png")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        encode_image(np.zeros((8, 8), dtype=np.uint8), "png")


def test_base64_round_trips():
    assert base64.b64decode(to_base64(b"\x00\xffimage")) == b"\x00\xffimage"
