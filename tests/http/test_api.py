"""The HTTP API in-process: the real FastAPI app, a fake generator behind it."""

from __future__ import annotations

import io
import time

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api
from deployments.ingress.errors import service_unavailable

from .checks import assert_openai_error, decode
from .fakes import pixels_for

GENERATIONS = "/v1/images/generations"


def test_b64_images_are_the_generated_pixels(client, generator):
    before = int(time.time())
    response = client.post(
        GENERATIONS, json={"prompt": "a fox", "n": 2, "seed": 41, "response_format": "b64_json"}
    )
    assert response.status_code == 200
    body = response.json()
    assert before <= body["created"] <= int(time.time())
    assert body["size"] == "64x32" and body["output_format"] == "png"
    assert [image["seed"] for image in body["data"]] == [41, 42]
    for image in body["data"]:
        assert image["revised_prompt"] is None
        assert "url" not in image
        assert np.array_equal(decode(image["b64_json"]), pixels_for(image["seed"], 64, 32))


def test_defaults_come_from_the_model_config(client, generator):
    client.post(GENERATIONS, json={"prompt": "a fox"})
    (job,) = generator.jobs
    assert (job.width, job.height) == (64, 32)
    assert job.num_inference_steps == 3
    assert job.guidance_scale == 5.0
    assert job.negative_prompt is None
    assert len(job.seeds) == 1


def test_extensions_reach_the_generator(client, generator):
    client.post(
        GENERATIONS,
        json={
            "prompt": "a fox",
            "negative_prompt": "blur",
            "size": "32x48",
            "num_inference_steps": 7,
            "guidance_scale": 0,
            "seed": 5,
        },
    )
    (job,) = generator.jobs
    assert (job.prompt, job.negative_prompt) == ("a fox", "blur")
    assert (job.width, job.height, job.num_inference_steps) == (32, 48, 7)
    assert job.guidance_scale == 0
    assert job.seeds == (5,)


def test_seeds_wrap_around_at_2_to_the_32(client, generator):
    response = client.post(GENERATIONS, json={"prompt": "x", "n": 2, "seed": 2**32 - 1})
    assert [image["seed"] for image in response.json()["data"]] == [2**32 - 1, 0]


def test_without_a_seed_each_request_gets_a_random_one(client, generator):
    for _ in range(2):
        client.post(GENERATIONS, json={"prompt": "x", "n": 3})
    first, second = (job.seeds for job in generator.jobs)
    assert first != second
    assert first[1] == (first[0] + 1) % 2**32


def test_url_images_are_served_by_the_service(client):
    response = client.post(GENERATIONS, json={"prompt": "x", "seed": 3, "output_format": "webp"})
    (image,) = response.json()["data"]
    assert "b64_json" not in image
    assert image["url"].startswith("http://testserver/v1/images/files/")
    fetched = client.get(image["url"])
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 32)


def test_public_base_url_is_used_for_links(args, generator, store):
    args = args.model_copy(
        update={
            "storage": args.storage.model_copy(
                update={"public_base_url": "https://images.example.com/"}
            )
        }
    )
    client = TestClient(create_api(args, {"tiny-sd3": generator}, store))
    url = client.post(GENERATIONS, json={"prompt": "x"}).json()["data"][0]["url"]
    assert url.startswith("https://images.example.com/v1/images/files/")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images/files/..%2F..%2Fetc%2Fpasswd",
        "/v1/images/files/%2e%2e",
        "/v1/images/files/" + "A" * 43 + ".png",
        "/v1/images/files/../../etc/passwd",
    ],
)
def test_missing_or_hostile_image_names_are_404(client, path):
    assert_openai_error(client.get(path), 404)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "n": 11}, "n"),
        ({"prompt": "x", "size": "4096x4096"}, "size"),
        ({"prompt": "x", "size": "65x64"}, "size"),
        ({"prompt": "x", "num_inference_steps": 21}, "num_inference_steps"),
        ({"prompt": "x", "response_format": "binary"}, "response_format"),
        ({"prompt": "x", "cfg": 3}, "cfg"),
        ({"n": 1}, "prompt"),
    ],
)
def test_bad_input_is_400_naming_the_parameter_and_not_retryable(client, generator, body, param):
    response = client.post(GENERATIONS, json=body)
    error = assert_openai_error(response, 400, param)
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-should-retry"] == "false"
    assert generator.jobs == []


@pytest.mark.parametrize("content", [b"not json", b'{"prompt": ', b"\xff\xfe", b""])
def test_unparsable_body_is_400(client, content):
    response = client.post(
        GENERATIONS, content=content, headers={"content-type": "application/json"}
    )
    assert "JSON" in assert_openai_error(response, 400)["message"]


def test_unknown_model_is_404(client, generator):
    response = client.post(GENERATIONS, json={"prompt": "x", "model": "dall-e-3"})
    error = assert_openai_error(response, 404, "model")
    assert error["code"] == "model_not_found"
    assert generator.jobs == []


def test_models_are_listed_in_openai_shape(client):
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    (card,) = listing["data"]
    assert card["id"] == "tiny-sd3" and card["object"] == "model"
    assert client.get("/v1/models/tiny-sd3").json() == card
    assert_openai_error(client.get("/v1/models/gpt-image-1"), 404, "model")


def test_unknown_routes_and_methods_use_the_error_shape(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get(GENERATIONS), 405)


def test_generator_failure_is_500_without_internals(client, generator, caplog):
    generator.fail_with = RuntimeError("CUDA out of memory at /secret/path.py line 12")
    response = client.post(GENERATIONS, json={"prompt": "x"}, headers={"x-request-id": "req-42"})
    error = assert_openai_error(response, 500)
    assert error["type"] == "server_error"
    assert "CUDA" not in response.text and "secret" not in response.text
    assert any("req-42" in record.getMessage() for record in caplog.records)


def test_overload_is_503_with_retry_after(client, generator):
    generator.fail_with = service_unavailable("busy", retry_after_s=2)
    response = client.post(GENERATIONS, json={"prompt": "x"})
    assert_openai_error(response, 503)
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-should-retry"] == "true"


def test_openai_client_works_unchanged(client):
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    result = api.images.generate(
        model="tiny-sd3",
        prompt="a fox",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 7},
    )
    assert [decode(image.b64_json).shape for image in result.data] == [(32, 32, 3)] * 2
    assert np.array_equal(decode(result.data[0].b64_json), pixels_for(7, 32, 32))


def test_openai_client_reads_errors(client):
    api = openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )
    with pytest.raises(openai.BadRequestError) as caught:
        api.images.generate(model="tiny-sd3", prompt="a fox", size="33x33")
    assert caught.value.param == "size"
    assert caught.value.code == "invalid_value"


def test_openapi_schema_documents_the_request_body(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/images/generations"]["post"]["requestBody"]
    properties = body["content"]["application/json"]["schema"]["properties"]
    assert {"prompt", "n", "size", "seed", "num_inference_steps"} <= set(properties)


def test_the_playground_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for asset in ("playground/playground.js", "playground/playground.css"):
        assert asset in page.text
        assert client.get(f"/{asset}").status_code == 200


def test_the_playground_can_be_turned_off(args, generator, store):
    args = AppArgs.model_validate({**args.model_dump(), "playground": False})
    client = TestClient(create_api(args, {"tiny-sd3": generator}, store))
    assert_openai_error(client.get("/"), 404)
    assert_openai_error(client.get("/playground/playground.js"), 404)
