"""Helpers for tests that start real Ray Serve applications on 127.0.0.1."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def one_at_a_time(*, request_timeout_s: float, max_steps: int = 5000, **limits) -> dict:
    """Args of a replica that runs one request at a time (one worker thread, no batching) on
    32x32 images of the embedded model: its load and timing are easy to reason about."""
    return {
        "models": [
            {"id": "tiny-sd3", "device": "cpu", "default_size": "32x32", "default_steps": 4}
        ],
        "limits": {"max_steps": max_steps, **limits},
        "batching": {"max_batch_images": 1},
        "worker_threads": 1,
        "request_timeout_s": request_timeout_s,
    }
