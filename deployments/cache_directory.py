"""Where the service keeps files on a node: built embedded models and stored images.

Both sides need it (the generator saves embedded models there, the ingress stores `url`
images there by default), so it lives beside them rather than in either.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "IMAGE_SERVICE_CACHE"


def default_cache_dir() -> Path:
    """`$IMAGE_SERVICE_CACHE`, else `~/.cache/image-service`."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "image-service"
