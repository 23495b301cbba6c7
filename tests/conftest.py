"""Fixtures shared by every tier.

The embedded model is built once per test session into a temporary cache, which Ray workers
started by the integration tests inherit through `IMAGE_SERVICE_CACHE`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from deployments.cache_directory import CACHE_ENV_VAR

_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="image-service-tests-"))
os.environ.setdefault(CACHE_ENV_VAR, str(_SESSION_CACHE))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ[CACHE_ENV_VAR])
