"""`partial_images` asks for previews; a model whose VAE could not be fitted for them says
so (`previews` in its capabilities), and the request is a 400 naming the parameter rather
than a stream that silently sends none."""

from __future__ import annotations

from dataclasses import replace

from fastapi.testclient import TestClient

from deployments.ingress.app import create_api

from .checks import assert_openai_error
from .fakes import EVERYTHING, FakeGenerator

GENERATIONS = "/v1/images/generations"
STREAM = {"prompt": "a fox", "stream": True, "size": "32x32"}


def test_previews_from_a_model_that_cannot_make_them_are_a_400(args, store):
    generator = FakeGenerator(replace(EVERYTHING, previews=False))
    client = TestClient(create_api(args, {"tiny-sd3": generator}, store))
    error = assert_openai_error(
        client.post(GENERATIONS, json={**STREAM, "partial_images": 2}), 400, "partial_images"
    )
    assert error["code"] == "unsupported_parameter"
    assert generator.jobs == []
    # Without previews it streams, progress and images.
    response = client.post(GENERATIONS, json=STREAM)
    assert response.status_code == 200 and "image_generation.completed" in response.text


def test_a_model_that_previews_streams_them(client):
    response = client.post(GENERATIONS, json={**STREAM, "partial_images": 2})
    assert response.status_code == 200
    assert "image_generation.partial_image" in response.text
