"""Fixtures of the in-process HTTP tier: the real FastAPI app around a fake generator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api
from deployments.storage import ImageStore
from tests.redis_server import RedisServer

from .fakes import FakeGenerator


@pytest.fixture
def generator() -> FakeGenerator:
    return FakeGenerator()


@pytest.fixture
def args() -> AppArgs:
    return AppArgs.model_validate(
        {
            "models": [
                {
                    "id": "tiny-sd3",
                    "default_size": "64x32",
                    "default_steps": 3,
                    "default_guidance_scale": 5.0,
                }
            ],
            "limits": {"max_pixels": 128 * 128, "max_steps": 20},
        }
    )


@pytest.fixture
def store(tmp_path) -> ImageStore:
    return ImageStore(tmp_path / "images", ttl_s=600)


@pytest.fixture
def client(args, generator, store) -> TestClient:
    return TestClient(
        create_api(args, {"tiny-sd3": generator}, store), raise_server_exceptions=False
    )


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
