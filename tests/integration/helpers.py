"""Helpers for tests that start real Ray Serve applications on 127.0.0.1."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
