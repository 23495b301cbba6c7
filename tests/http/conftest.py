"""Fixtures of the in-process HTTP tier: the real FastAPI app around a fake generator."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api
from deployments.storage import ImageStore

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
