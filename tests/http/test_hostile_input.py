"""What a hostile client may send: text that is not text, numbers that are not numbers, a
body in a form that skips the browser's CORS preflight, and a look at the docs without a key.
Each is a 4xx in the API's shape, never a 500, and nothing reaches the generator."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api

from .checks import assert_openai_error

GENERATIONS = "/v1/images/generations"
KEYS_ENV = "IMAGE_SERVICE_TEST_KEYS"


def post_raw(client: TestClient, body: str, content_type: str = "application/json"):
    return client.post(
        GENERATIONS, content=body.encode("utf-8"), headers={"content-type": content_type}
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"prompt": "a\\ud800"}', "prompt"),
        ('{"prompt": "x", "negative_prompt": "\\udfff b"}', "negative_prompt"),
        ('{"prompt": "x", "user": "\\ud800"}', "user"),
        ('{"prompt": "x", "model": "\\ud800"}', "model"),
        ('{"prompt": "x", "size": "\\ud800"}', "size"),
        ('{"prompt": "x", "\\ud800": 1}', None),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_its_field(client, generator, body, param):
    error = assert_openai_error(post_raw(client, body), 400, param)
    assert error["code"] == "invalid_value"
    assert generator.jobs == []


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": True}, "n"),
        ({"n": "2"}, "n"),
        ({"n": 2.0}, "n"),
        ({"seed": True}, "seed"),
        ({"seed": "5"}, "seed"),
        ({"guidance_scale": "5"}, "guidance_scale"),
        ({"num_inference_steps": "3"}, "num_inference_steps"),
        ({"output_compression": False}, "output_compression"),
        ({"prompt": 5}, "prompt"),
        ({"stream": "true"}, "stream"),
    ],
)
def test_json_numbers_booleans_and_strings_are_taken_strictly(client, generator, fields, param):
    response = client.post(GENERATIONS, json={"prompt": "x", **fields})
    assert_openai_error(response, 400, param)
    assert generator.jobs == []


def test_an_integer_is_a_fine_float(client, generator):
    assert client.post(GENERATIONS, json={"prompt": "x", "guidance_scale": 5}).status_code == 200
    assert generator.jobs[0].guidance_scale == 5.0


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""],
)
def test_json_routes_take_json_only(client, generator, content_type):
    response = post_raw(client, json.dumps({"prompt": "x"}), content_type)
    error = assert_openai_error(response, 415)
    assert error["code"] == "unsupported_media_type"
    assert generator.jobs == []


def test_json_with_a_charset_is_json(client):
    response = post_raw(client, json.dumps({"prompt": "x"}), "Application/JSON; charset=utf-8")
    assert response.status_code == 200


DOCS = ("/openapi.json", "/docs", "/redoc")


def test_the_docs_are_open_without_keys(client):
    for path in DOCS:
        assert client.get(path).status_code == 200, path


def test_the_docs_need_a_key_when_keys_are_on(args, generator, store, monkeypatch):
    monkeypatch.setenv(KEYS_ENV, "sk-first")
    keyed = AppArgs.model_validate({**args.model_dump(), "auth": {"api_keys_env": KEYS_ENV}})
    client = TestClient(create_api(keyed, {"tiny-sd3": generator}, store))
    assert_openai_error(client.get("/openapi.json"), 401)
    schema = client.get("/openapi.json", headers={"authorization": "Bearer sk-first"}).json()
    assert "/v1/images/generations" in schema["paths"]
    # The browsable pages cannot send a key: off while keys are on.
    for path in ("/docs", "/redoc"):
        assert client.get(path, headers={"authorization": "Bearer sk-first"}).status_code == 404


@pytest.mark.parametrize(("depth", "param"), [(900, "user"), (5000, None)])
def test_json_nested_past_the_parsers_limit_is_a_400(client, generator, depth, param):
    body = '{"prompt": "x", "user": ' + "[" * depth + "]" * depth + "}"
    response = post_raw(client, body)
    assert_openai_error(response, 400, param)
    assert generator.jobs == []


def test_a_page_of_another_origin_cannot_post(client, generator):
    """A form POST needs no CORS preflight: without this check any page could make its
    visitors' browsers run edits (or generations) on the service."""
    foreign = {"origin": "https://evil.example"}
    response = client.post(GENERATIONS, json={"prompt": "x"}, headers=foreign)
    assert assert_openai_error(response, 403)["code"] == "origin_not_allowed"
    files = {"image": ("in.png", b"not even an image", "image/png")}
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files=files, headers=foreign)
    assert_openai_error(response, 403)
    assert generator.jobs == []
    # The service's own pages (the playground) and clients without Origin pass.
    same = {"origin": "http://testserver"}
    assert client.post(GENERATIONS, json={"prompt": "x"}, headers=same).status_code == 200
    assert client.post(GENERATIONS, json={"prompt": "x"}).status_code == 200
