"""Turning generated pixels into what a client receives: encoded images, inline or linked.

Runs on the ingress, in worker threads (encoding a large PNG takes tens of milliseconds).
An image that cannot be stored is the API's retryable 503 (`storage_unavailable`), in a
plain answer and in a stream's `error` event alike.
"""

from __future__ import annotations

import logging

import numpy as np

from deployments.ingress.encoding import encode_image, to_base64, upscale
from deployments.ingress.errors import storage_unavailable
from deployments.ingress.protocol import Image, ImageRequest
from deployments.ingress.storage import ImageStorage, StorageUnavailable

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

    def image(self, pixels: np.ndarray, seed: int, inline: bool) -> Image:
        """One final image: base64 in the answer when `inline`, else stored and linked."""
        data = self.encode(pixels)
        if inline:
            return Image(b64_json=to_base64(data), seed=seed)
        try:
            name = self._store.save(data, self._params.output_format)
        except StorageUnavailable as error:
            # The cause (a path, an errno) goes to the log, never to the client.
            logger.error("storing an image failed: %s", error)
            raise storage_unavailable() from None
        return Image(url=f"{self._base_url}{IMAGE_FILES_PATH}/{name}", seed=seed)

    def images(self, images: list[np.ndarray], seeds: tuple[int, ...]) -> list[Image]:
        inline = self._params.response_format == "b64_json"
        return [
            self.image(pixels, seed, inline) for pixels, seed in zip(images, seeds, strict=True)
        ]

    def preview(self, pixels: np.ndarray, width: int, height: int) -> str:
        """A preview, scaled up to the image's size, as base64 in the requested format."""
        return to_base64(self.encode(upscale(pixels, width, height)))
