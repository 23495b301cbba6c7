"""Storage of `response_format: url` images under unguessable names, for their TTL.

`open_store` gives the store `args.storage` describes: a directory
(`directory_store.ImageStore`) or an S3-compatible bucket (`object_store.S3ImageStore`),
both keeping to `stored_images.ImageStorage`. The backends import only `stored_images`, never
this face, so the package has no import cycle.
"""

from __future__ import annotations

from deployments.config.app_config import StorageConfig
from deployments.storage.directory_store import ImageStore
from deployments.storage.stored_images import (
    ImageStorage,
    StorageMisconfigured,
    StorageUnavailable,
    is_image_name,
    media_type_of,
    new_name,
)

__all__ = [
    "ImageStorage",
    "ImageStore",
    "StorageMisconfigured",
    "StorageUnavailable",
    "is_image_name",
    "media_type_of",
    "new_name",
    "open_store",
]


def open_store(config: StorageConfig) -> ImageStorage:
    """The store `args.storage` describes: its bucket if `s3` is set, else its directory."""
    if config.s3 is not None:
        # Imported here: boto3 is loaded only by ingresses that use a bucket.
        from deployments.storage.object_store import S3ImageStore

        return S3ImageStore.from_config(config.s3, config.ttl_s)
    return ImageStore.from_config(config)
