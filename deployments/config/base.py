"""What every part of the config shares: the strict base of each config model (`args:` and
everything under it), and where the service keeps files on a node by default.

The cache directory is here because both sides need it (the generator saves embedded models
there, the ingress stores `url` images there by default) and the config names it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

CACHE_ENV_VAR = "IMAGE_SERVICE_CACHE"


class Strict(BaseModel):
    """Arguments are frozen and reject unknown keys (a misspelt option must fail)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def default_cache_dir() -> Path:
    """`$IMAGE_SERVICE_CACHE`, else `~/.cache/image-service`: built embedded models and
    stored images."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "image-service"
