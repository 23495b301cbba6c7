"""`GET /v1/models` says per model what it takes (an extension, `capabilities`), once one of
its replicas has reported it; a model still starting is listed at once, without them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from fastapi.testclient import TestClient

from deployments.ingress.app import create_api
from deployments.ingress.service import CARD_WAIT_S

from .fakes import EVERYTHING, FakeGenerator


def test_each_model_card_carries_its_capabilities(client):
    (card,) = client.get("/v1/models").json()["data"]
    assert card["id"] == "tiny-sd3"
    assert card["capabilities"] == {
        "tasks": ["image-to-image", "inpaint", "text-to-image"],
        "parameters": {
            "text-to-image": ["guidance_scale", "negative_prompt"],
            "image-to-image": ["guidance_scale", "input_fidelity", "negative_prompt", "strength"],
            "inpaint": ["guidance_scale", "input_fidelity", "mask", "negative_prompt", "strength"],
        },
        "guidance": "classifier-free",
        "size_multiple": 1,
        "max_width": None,
        "max_height": None,
        "previews": True,
        "reference_images": 0,
        "reference_max_aspect": None,
    }
    assert client.get("/v1/models/tiny-sd3").json() == card


def test_a_distilled_model_says_so(args, store):
    generator = FakeGenerator(replace(EVERYTHING, guidance="distilled", previews=False))
    client = TestClient(create_api(args, {"tiny-sd3": generator}, store))
    capabilities = client.get("/v1/models/tiny-sd3").json()["capabilities"]
    assert (capabilities["guidance"], capabilities["previews"]) == ("distilled", False)


class StartingGenerator(FakeGenerator):
    async def capabilities(self):
        await asyncio.sleep(3600)  # no replica yet


def test_a_model_still_starting_is_listed_at_once_without_capabilities(args, store):
    client = TestClient(create_api(args, {"tiny-sd3": StartingGenerator()}, store))
    started = time.monotonic()
    (card,) = client.get("/v1/models").json()["data"]
    assert time.monotonic() - started < CARD_WAIT_S + 1
    assert card["id"] == "tiny-sd3" and card["capabilities"] is None
