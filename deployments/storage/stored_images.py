"""What every store of generated files keeps to: the `ImageStorage` protocol, its two
errors, and the names files are stored under.

The store keeps `response_format: url` images for the ingress, and video jobs' MP4 files and
thumbnails for the video worker (which writes them) and the ingress (which serves them): it
is shared by both sides, so either reads what the other wrote.

A name is 256 random bits (URL-safe base64) plus the format's extension. Lookups accept only
names of exactly that shape, so no path a client sends can leave a directory (or a bucket's
prefix).
"""

from __future__ import annotations

import re
import secrets
from typing import Protocol

# The formats a store keeps, by extension: the images' three and the videos' MP4.
MEDIA_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "mp4": "video/mp4",
}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{43}\.(png|jpeg|webp|mp4)$")


class StorageUnavailable(RuntimeError):
    """An image could not be written or read; the message says why, for the logs only.
    `lasting`: a retry within seconds cannot help (a full or read-only volume), so the
    client is told not to regenerate its images into it."""

    def __init__(self, message: str, *, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting


class StorageMisconfigured(RuntimeError):
    """The configured store cannot be used at all (a missing bucket, refused credentials):
    the ingress refuses to start, with this message naming the `args.storage` key."""


def new_name(output_format: str) -> str:
    """A fresh name for an image of this format."""
    if output_format not in MEDIA_TYPES:
        raise ValueError(f"unsupported output format {output_format!r}")
    return f"{secrets.token_urlsafe(32)}.{output_format}"


def is_image_name(name: str) -> bool:
    """Whether `name` has the shape of a name `new_name` makes (nothing else is looked up)."""
    return NAME_PATTERN.fullmatch(name) is not None


def media_type_of(name: str) -> str:
    return MEDIA_TYPES[name.rsplit(".", 1)[1]]


class ImageStorage(Protocol):
    """Where the images of `url` answers are kept, by name, for the TTL. Both methods block
    (disk or network): the service calls them in worker threads."""

    def save(self, data: bytes, output_format: str) -> str:
        """Store an encoded image and return its name; `StorageUnavailable` if it cannot be
        stored, with nothing under that name readable."""
        ...

    def read(self, name: str) -> bytes | None:
        """The bytes of a stored, unexpired image; None for any other name (expired, never
        stored, or not of a stored image's shape). `StorageUnavailable` if the store cannot
        be reached."""
        ...

    def discard(self, name: str) -> None:
        """Drop an image stored for an answer that failed, so that no file is left with no
        URL to it; best effort (never raises)."""
        ...

    def media_type(self, name: str) -> str: ...

    def close(self) -> None: ...
