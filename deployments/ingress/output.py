"""Turning generated pixels into what a client receives: encoded images, inline or linked.

Runs on the ingress, in worker threads (encoding a large PNG takes tens of milliseconds).
An image that cannot be stored is the API's 503 (`storage_unavailable`: retryable unless the
volume is full or read-only), in a plain answer and in a stream's `error` event alike, and
none of the request's images stays stored.
"""

from __future__ import annotations

import logging

import numpy as np

from deployments.ingress.encoding import encode_image, to_base64, upscale
from deployments.ingress.errors import storage_unavailable
from deployments.ingress.protocol import Image, ImageRequest
from deployments.storage import ImageStorage, StorageUnavailable

logger = logging.getLogger("ray.serve")

IMAGE_FILES_PATH = "/v1/images/files"


class ImagePackager:
    """Encodes the images of one request the way it asked for them."""

    def __init__(self, params: ImageRequest, store: ImageStorage, base_url: str) -> None:
        self._params = params
        self._store = store
        self._base_url = base_url.rstrip("/")

    def encode(self, pixels: np.ndarray) -> bytes:
        return encode_image(pixels, self._params.output_format, self._params.output_compression)

    def images(
        self, images: list[np.ndarray], seeds: tuple[int, ...], inline: bool | None = None
    ) -> list[Image]:
        """A request's final images: base64 in the answer when `inline` (by default, when it
        asked for `b64_json`), else stored and linked. If one cannot be stored, those stored
        before it are discarded (no file is left that no answer names) and the request
        fails with `storage_unavailable`."""
        if inline is None:
            inline = self._params.response_format == "b64_json"
        answered: list[Image] = []
        stored: list[str] = []
        try:
            for pixels, seed in zip(images, seeds, strict=True):
                data = self.encode(pixels)
                if inline:
                    answered.append(Image(b64_json=to_base64(data), seed=seed))
                    continue
                name = self._save(data)
                stored.append(name)
                url = f"{self._base_url}{IMAGE_FILES_PATH}/{name}"
                answered.append(Image(url=url, seed=seed))
        except BaseException:
            # A failed answer names none of the images it stored: none of them stays.
            for name in stored:
                self._store.discard(name)
            raise
        return answered

    def _save(self, data: bytes) -> str:
        try:
            return self._store.save(data, self._params.output_format)
        except StorageUnavailable as error:
            # The cause (a path, an errno) goes to the log, never to the client.
            logger.error("storing an image failed: %s", error)
            raise storage_unavailable(lasting=error.lasting) from None

    def preview(self, pixels: np.ndarray, width: int, height: int) -> str:
        """A preview, scaled up to the image's size, as base64 in the requested format."""
        return to_base64(self.encode(upscale(pixels, width, height)))
