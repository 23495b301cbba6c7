"""What every response of the API must look like."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
from PIL import Image


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None):
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    assert "Traceback" not in response.text
    return body["error"]
