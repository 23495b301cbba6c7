"""`stream: true`: server-sent events in OpenAI's form, previews, progress and stream errors."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from deployments.ingress.app import create_api
from deployments.ingress.errors import service_unavailable

from .checks import assert_openai_error, decode
from .fakes import pixels_for


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event type, data) of each event of a text/event-stream body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def stream(client: TestClient, **body) -> tuple[int, str, list[tuple[str, dict]]]:
    response = client.post(
        "/v1/images/generations", json={"prompt": "a fox", "stream": True, **body}
    )
    if response.status_code != 200:
        return response.status_code, response.headers["content-type"], []
    return 200, response.headers["content-type"], sse_events(response.text)


def test_stream_sends_previews_then_one_completed_event_per_image(client):
    status, content_type, events = stream(
        client, n=2, size="64x32", num_inference_steps=8, partial_images=3, seed=5
    )
    assert status == 200
    assert content_type.startswith("text/event-stream")
    types = [kind for kind, _ in events]
    assert types == ["image_generation.partial_image"] * 6 + ["image_generation.completed"] * 2
    partial = [data for kind, data in events if kind.endswith("partial_image")]
    assert [(p["image_index"], p["partial_image_index"]) for p in partial] == [
        (0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)
    ]  # fmt: skip
    # Previews come scaled up to the image's size, in its format.
    assert {decode(p["b64_json"]).shape for p in partial} == {(32, 64, 3)}
    completed = [data for kind, data in events if kind.endswith("completed")]
    assert [c["seed"] for c in completed] == [5, 6]
    assert np.array_equal(decode(completed[1]["b64_json"]), pixels_for(6, 64, 32))
    assert {c["size"] for c in completed} == {"64x32"}
    assert {c["output_format"] for c in completed} == {"png"}
    assert "url" not in completed[0]


def test_progress_events_only_when_asked_for(client):
    _, _, quiet = stream(client, num_inference_steps=4)
    assert [kind for kind, _ in quiet] == ["image_generation.completed"]
    _, _, verbose = stream(client, num_inference_steps=4, stream_progress=True)
    progress = [data for kind, data in verbose if kind == "image_generation.progress"]
    assert [(p["step"], p["total_steps"]) for p in progress] == [(s, 4) for s in range(1, 5)]
    assert verbose[-1][0] == "image_generation.completed"


def test_url_form_streams_links_when_asked_for_by_name(client):
    _, _, events = stream(client, response_format="url")
    ((_kind, completed),) = events
    assert "b64_json" not in completed
    assert client.get(completed["url"]).status_code == 200


@pytest.mark.parametrize(
    "body, param",
    [
        ({"partial_images": 2}, "partial_images"),
        ({"stream_progress": True}, "stream_progress"),
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_bad_streaming_options_are_400(client, generator, body, param):
    response = client.post("/v1/images/generations", json={"prompt": "a fox", **body})
    assert_openai_error(response, 400, param=param)
    assert generator.jobs == []


def test_a_stream_that_cannot_start_is_a_plain_http_error(client, generator):
    generator.fail_with = service_unavailable("full", retry_after_s=2)
    response = client.post("/v1/images/generations", json={"prompt": "a fox", "stream": True})
    assert_openai_error(response, 503)
    assert response.headers["retry-after"] == "2"


def test_timeout_mid_stream_ends_it_with_an_error_event_and_cancels(args, generator, store):
    args = args.model_copy(update={"request_timeout_s": 1.0})
    generator.delay_s = 4.0  # 0.2 s a step
    client = TestClient(create_api(args, {"tiny-sd3": generator}, store))
    _, _, events = stream(client, num_inference_steps=20, stream_progress=True)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "image_generation.progress"
    assert kinds[-1] == "error"
    assert events[-1][1]["error"]["code"] == "timeout"
    assert generator.cancelled == generator.jobs


def test_openai_client_streams(client):
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    events = list(
        api.images.generate(
            model="tiny-sd3",
            prompt="a fox",
            size="32x32",
            stream=True,
            partial_images=2,
            extra_body={"seed": 3, "num_inference_steps": 6},
        )
    )
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert np.array_equal(decode(events[-1].b64_json), pixels_for(3, 32, 32))


def test_openai_client_raises_a_mid_stream_error(args, generator, store):
    args = args.model_copy(update={"request_timeout_s": 1.0})
    generator.delay_s = 4.0  # 0.2 s a step
    client = TestClient(create_api(args, {"tiny-sd3": generator}, store))
    api = openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )
    with pytest.raises(openai.APIError, match="not ready within"):
        list(
            api.images.generate(prompt="a fox", stream=True, extra_body={"num_inference_steps": 20})
        )
