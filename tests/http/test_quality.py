"""OpenAI's `quality` picks the model's step preset (`models[].quality_steps`) instead of
being ignored; an explicit `num_inference_steps` wins, and the usage counts what ran."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api

GENERATIONS = "/v1/images/generations"


def client_with(args: AppArgs, generator, store, **quality_steps) -> TestClient:
    model = {**args.models[0].model_dump(), "default_steps": 8, "quality_steps": quality_steps}
    configured = AppArgs.model_validate({**args.model_dump(), "models": [model]})
    return TestClient(create_api(configured, {"tiny-sd3": generator}, store))


@pytest.mark.parametrize(
    "quality, steps",
    [(None, 8), ("auto", 8), ("low", 4), ("medium", 8), ("standard", 8), ("high", 8), ("hd", 8)],
)
def test_the_default_presets(args, generator, store, quality, steps):
    client = client_with(args, generator, store)
    body = {"prompt": "a fox"} | ({"quality": quality} if quality else {})
    response = client.post(GENERATIONS, json=body)
    assert response.status_code == 200
    assert generator.jobs[-1].num_inference_steps == steps
    assert response.json()["usage"]["output_tokens"] == steps


@pytest.mark.parametrize(
    "quality, steps", [("low", 2), ("medium", 6), ("standard", 6), ("high", 16), ("hd", 16)]
)
def test_configured_presets(args, generator, store, quality, steps):
    client = client_with(args, generator, store, low=2, medium=6, high=16)
    assert client.post(GENERATIONS, json={"prompt": "a fox", "quality": quality}).is_success
    assert generator.jobs[-1].num_inference_steps == steps


def test_num_inference_steps_wins_over_quality(args, generator, store):
    client = client_with(args, generator, store, high=16)
    body = {"prompt": "a fox", "quality": "high", "num_inference_steps": 3}
    assert client.post(GENERATIONS, json=body).is_success
    assert generator.jobs[-1].num_inference_steps == 3


def test_a_preset_past_the_step_limit_is_refused_by_name(args):
    model = {**args.models[0].model_dump(), "quality_steps": {"high": 21}}
    with pytest.raises(ValidationError, match=r"quality_steps\.high \(21\) exceeds"):
        AppArgs.model_validate({**args.model_dump(), "models": [model]})
