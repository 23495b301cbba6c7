"""Helpers for tests that start real Ray Serve applications on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import socket
import time

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_first_image(base_url: str, timeout_s: float) -> tuple[httpx.Response, float]:
    """Poll until the service answers a generation with 200; return it and the seconds taken."""
    started = time.monotonic()
    last_error: object = None
    while time.monotonic() - started < timeout_s:
        try:
            response = httpx.post(
                f"{base_url}/v1/images/generations",
                json={"prompt": "first light", "response_format": "b64_json"},
                timeout=30,
            )
            if response.status_code == 200:
                return response, time.monotonic() - started
            last_error = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as error:
            last_error = error
        time.sleep(0.5)
    raise TimeoutError(f"no image from {base_url} in {timeout_s}s; last: {last_error}")


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
