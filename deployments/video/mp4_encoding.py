"""A clip's frames as the files a client downloads: an MP4 (H.264) and a WebP thumbnail.

H.264 in yuv420p with the MP4's index at the front (`+faststart`): what every browser and
player plays, and starts playing before the whole file has arrived. yuv420p keeps one colour
sample per 2x2 pixels, so width and height must be even (a video model's size multiple
makes them so; other sizes are refused, not padded, so the file is the size asked for).

PyAV's wheel ships its own FFmpeg with libx264: nothing to install on the machine. No torch
here: encoding runs wherever the frames are, the ingress side included.
"""

from __future__ import annotations

import io
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

# x264's constant rate factor: 18 is visually lossless for most content, and a few seconds
# of video stay a few MB. (23 is x264's default; lower is better and bigger.)
CRF = 18
# The speed/size trade-off of x264's presets: "medium" is its default, and a clip of a few
# seconds encodes in well under a second of the minutes it took to generate.
PRESET = "medium"
THUMBNAIL_QUALITY = 80


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 (frames, height, width, 3); got {frames.dtype} {frames.shape}"
        )
    if frames.shape[0] < 1:
        raise ValueError("frames: a video needs at least one frame")


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """`frames`, uint8 (frames, height, width, 3) RGB, as an H.264 MP4 at `fps` frames per
    second. Raises ValueError for odd widths or heights (yuv420p needs even ones)."""
    _check_frames(frames)
    _, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even width and height; got {width}x{height}")
    if fps < 1:
        raise ValueError(f"fps must be at least 1; got {fps}")
    # `movflags=+faststart` moves the index (moov) before the data once the file is written,
    # which FFmpeg does by opening the file again by its name: a file, not a BytesIO.
    with tempfile.TemporaryDirectory(prefix="mp4-") as directory:
        path = Path(directory) / "video.mp4"
        _write_mp4(path, frames, fps)
        return path.read_bytes()


def _write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    count, height, width, _ = frames.shape
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as output:
        stream = output.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        # One tick a frame: frame i is shown at i / fps seconds.
        stream.codec_context.time_base = Fraction(1, fps)
        stream.options = {"crf": str(CRF), "preset": PRESET}
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[index]), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():  # flush the frames x264 still holds (B-frames)
            output.mux(packet)


def encode_thumbnail(frames: np.ndarray) -> bytes:
    """The clip's first frame as a WebP image of the clip's size."""
    _check_frames(frames)
    buffer = io.BytesIO()
    Image.fromarray(frames[0], mode="RGB").save(buffer, format="WEBP", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()
