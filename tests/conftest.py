"""Fixtures shared by every tier.

The embedded model is built once per test session into a temporary cache, which Ray workers
started by the integration tests inherit through `IMAGE_SERVICE_CACHE`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.config.base import CACHE_ENV_VAR
from tests.redis_server import RedisServer

_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="image-service-tests-"))
os.environ.setdefault(CACHE_ENV_VAR, str(_SESSION_CACHE))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ[CACHE_ENV_VAR])


# --- a real S3 API (moto's server), for the bucket backend of `storage.s3` ------------------


@pytest.fixture(scope="session")
def s3_server():
    """One moto server for the session; tests that stop it take `own_s3_server`."""
    from tests.s3 import S3Server

    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_s3_server():
    """A moto server of the test's own, to stop and start (its buckets outlive a stop)."""
    from tests.s3 import S3Server

    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(monkeypatch):
    """Dummy credentials in the environment, where boto3's default chain finds them."""
    from tests.s3 import S3_ENV

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)


# --- a real Redis (`redis-server`), for the quotas and the video jobs ------------------------


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(shared_redis) -> RedisServer:
    """The session's Redis, emptied for each test."""
    with shared_redis.client() as client:
        client.flushall()
    return shared_redis


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A Redis of the test's own, for tests that stop or restart it."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
