"""`usage` in image responses, in OpenAI's shape and this service's units: text tokens as the
replica counts them, 1 image token per upload of an edit, and image-steps as output tokens."""

from __future__ import annotations

import io

import openai
import pytest
from fastapi.testclient import TestClient

from deployments.ingress.app import create_api
from deployments.jobs import ModelCapabilities

from .fakes import EVERYTHING, FakeGenerator
from .test_edits import edit, png
from .test_streaming import sse_events

GENERATIONS = "/v1/images/generations"


def openai_client(client) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)


def test_a_generation_reports_its_usage_in_openais_field_order(client):
    response = client.post(
        GENERATIONS,
        json={"prompt": "a red fox", "negative_prompt": "blurry", "n": 2, "num_inference_steps": 5},
    )
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["created", "data", "output_format", "size", "usage"]
    # Text: the fake replica's 3 + 1 words. Output: 2 images x 5 steps.
    assert body["usage"] == {
        "input_tokens": 4,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 4},
        "output_tokens": 10,
        "total_tokens": 14,
    }
    order = ["input_tokens", "input_tokens_details", "output_tokens", "total_tokens"]
    assert list(body["usage"]) == order
    assert list(body["usage"]["input_tokens_details"]) == ["image_tokens", "text_tokens"]


def test_the_openai_client_reads_the_usage(client):
    response = openai_client(client).images.generate(
        prompt="a fox in snow", n=3, extra_body={"num_inference_steps": 4}
    )
    assert response.usage.input_tokens_details.text_tokens == 4
    assert response.usage.input_tokens_details.image_tokens == 0
    assert response.usage.output_tokens == 12
    assert response.usage.total_tokens == 16


@pytest.mark.parametrize(
    "rounding, strength, steps_run", [("floor", 0.5, 4), ("floor", 0.3, 2), ("ceil", 0.3, 3)]
)
def test_an_edit_counts_the_steps_it_runs_and_its_uploads(
    args, store, rounding, strength, steps_run
):
    capabilities = ModelCapabilities(
        pipeline_class=EVERYTHING.pipeline_class,
        tasks=EVERYTHING.tasks,
        edit_step_rounding={"image-to-image": rounding, "inpaint": rounding},
    )
    client = TestClient(create_api(args, {"tiny-sd3": FakeGenerator(capabilities)}, store))
    plain = edit(client, n=2, strength=strength, num_inference_steps=8)
    assert plain.status_code == 200, plain.text
    assert plain.json()["usage"]["output_tokens"] == 2 * steps_run
    assert plain.json()["usage"]["input_tokens_details"] == {"image_tokens": 1, "text_tokens": 3}
    files = {
        "image": ("in.png", png(64, 32), "image/png"),
        "mask": ("mask.png", png(64, 32, "RGBA", (0, 0, 0, 0)), "image/png"),
    }
    masked = edit(client, files=files, strength=strength, num_inference_steps=8)
    assert masked.status_code == 200, masked.text
    assert masked.json()["usage"] == {
        "input_tokens": 5,
        "input_tokens_details": {"image_tokens": 2, "text_tokens": 3},
        "output_tokens": steps_run,
        "total_tokens": 5 + steps_run,
    }


def test_the_openai_client_reads_an_edits_usage(client):
    response = openai_client(client).images.edit(
        image=("in.png", io.BytesIO(png(64, 32)), "image/png"),
        prompt="make it blue",
        extra_body={"num_inference_steps": 6},
    )
    assert response.usage.input_tokens_details.image_tokens == 1
    assert response.usage.input_tokens_details.text_tokens == 3
    # The model's default strength, 0.8, of 6 steps: int(4.8) = 4 steps run.
    assert response.usage.output_tokens == 4
    assert response.usage.total_tokens == 8


def test_each_streamed_completed_event_carries_the_requests_usage(client):
    body = {"prompt": "a red fox", "n": 2, "num_inference_steps": 5, "partial_images": 1}
    streamed = client.post(GENERATIONS, json={**body, "stream": True})
    completed = [data for kind, data in sse_events(streamed.text) if kind.endswith("completed")]
    plain = client.post(GENERATIONS, json=body | {"partial_images": 0})
    assert [event["usage"] for event in completed] == [plain.json()["usage"]] * 2
    assert completed[0]["usage"]["output_tokens"] == 10


def test_the_openai_client_reads_a_streamed_usage(client):
    events = list(
        openai_client(client).images.generate(
            prompt="a red fox", stream=True, extra_body={"num_inference_steps": 7}
        )
    )
    assert events[-1].type == "image_generation.completed"
    assert events[-1].usage.output_tokens == 7
    assert events[-1].usage.input_tokens_details.text_tokens == 3
    assert events[-1].usage.total_tokens == 10
