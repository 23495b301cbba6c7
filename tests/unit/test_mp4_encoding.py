"""A clip's frames encode to an MP4 that decodes back (with PyAV, the FFmpeg players use) to
H.264 frames of the same number, size and rate, with the pixels roughly kept; the index is
at the front of the file; and its thumbnail is a WebP of the first frame."""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from deployments.video.mp4_encoding import encode_mp4, encode_thumbnail

FPS = 16


def smooth_clip(count: int = 17, width: int = 48, height: int = 32) -> np.ndarray:
    """Frames of gradients that move: what a codec keeps well (noise it does not)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = [
        np.stack([(4 * x + 8 * i) % 256, (6 * y + 3 * i) % 256, np.full_like(x, 96 + 4 * i)], -1)
        for i in range(count)
    ]
    return np.stack(frames).astype(np.uint8)


@dataclass(frozen=True)
class StreamInfo:
    """What the tests read of a decoded MP4's video stream (read while its container is
    open: PyAV 18.1.1 refuses a closed container's stream attributes)."""

    codec: str
    pix_fmt: str
    width: int
    height: int
    average_rate: Fraction
    frames: int


def decode(data: bytes) -> tuple[StreamInfo, list[np.ndarray], list[float]]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        info = StreamInfo(
            codec=stream.codec_context.name,
            pix_fmt=stream.codec_context.pix_fmt,
            width=stream.width,
            height=stream.height,
            average_rate=stream.average_rate,
            frames=stream.frames,
        )
        return (
            info,
            [frame.to_ndarray(format="rgb24") for frame in decoded],
            [float(frame.time) for frame in decoded],
        )


def test_an_mp4_decodes_back_to_the_clip():
    clip = smooth_clip()
    stream, frames, times = decode(encode_mp4(clip, FPS))
    assert stream.codec == "h264"
    assert stream.pix_fmt == "yuv420p"
    assert (stream.width, stream.height) == (48, 32)
    assert stream.average_rate == FPS
    assert len(frames) == stream.frames == 17
    # Frame i is shown at i / fps seconds.
    assert times == pytest.approx([i / FPS for i in range(17)])
    error = np.abs(np.stack(frames).astype(int) - clip.astype(int))
    assert error.mean() < 4
    assert np.percentile(error, 99) < 16


def test_the_index_comes_before_the_data():
    """`+faststart`: a player starts before the whole file has arrived."""
    data = encode_mp4(smooth_clip(), FPS)
    assert data[4:8] == b"ftyp"
    assert 0 < data.find(b"moov") < data.find(b"mdat")


@pytest.mark.parametrize("fps", [8, 24, 30])
def test_the_rate_is_the_one_asked(fps):
    stream, frames, times = decode(encode_mp4(smooth_clip(count=9), fps))
    assert stream.average_rate == fps
    assert len(frames) == 9
    assert times[-1] == pytest.approx(8 / fps)


def test_a_single_frame_is_a_video_too():
    _, frames, _ = decode(encode_mp4(smooth_clip(count=1), FPS))
    assert len(frames) == 1


def test_odd_sizes_and_other_arrays_are_refused():
    with pytest.raises(ValueError, match="even"):
        encode_mp4(smooth_clip(width=47), FPS)
    with pytest.raises(ValueError, match="even"):
        encode_mp4(smooth_clip(height=33), FPS)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(smooth_clip().astype(np.float32), FPS)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(smooth_clip()[0], FPS)
    with pytest.raises(ValueError, match="fps"):
        encode_mp4(smooth_clip(), 0)


def test_the_thumbnail_is_a_webp_of_the_first_frame():
    clip = smooth_clip()
    with Image.open(io.BytesIO(encode_thumbnail(clip))) as thumbnail:
        assert thumbnail.format == "WEBP"
        assert thumbnail.size == (48, 32)
        pixels = np.asarray(thumbnail.convert("RGB")).astype(int)
    assert np.abs(pixels - clip[0]).mean() < np.abs(pixels - clip[-1]).mean()
    assert np.abs(pixels - clip[0]).mean() < 8
