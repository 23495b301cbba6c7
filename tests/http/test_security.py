"""Keys, body size, timeouts and CORS: what a shared service needs against misuse."""

from __future__ import annotations

import os
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api
from deployments.ingress.auth import NoAPIKeys, bearer_token, parse_keys

from .checks import assert_openai_error
from .test_edits import edit

GENERATIONS = "/v1/images/generations"
KEYS_ENV = "IMAGE_SERVICE_TEST_KEYS"


def with_args(args: AppArgs, **update) -> AppArgs:
    return AppArgs.model_validate({**args.model_dump(), **update})


@pytest.fixture
def keyed_client(args, generator, store, monkeypatch) -> TestClient:
    monkeypatch.setenv(KEYS_ENV, "sk-first, sk-second")
    args = with_args(args, auth={"api_keys_env": KEYS_ENV})
    return TestClient(
        create_api(args, {"tiny-sd3": generator}, store), raise_server_exceptions=False
    )


def test_auth_is_off_by_default(client):
    assert client.post(GENERATIONS, json={"prompt": "x"}).status_code == 200


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"authorization": "Bearer "}, "missing_api_key"),
        ({"authorization": "Basic c2stZmlyc3Q6"}, "missing_api_key"),
        ({"authorization": "Bearer sk-firs"}, "invalid_api_key"),
        ({"authorization": "Bearer sk-first-and-more"}, "invalid_api_key"),
        ({"authorization": "Bearer sk-first, sk-second"}, "invalid_api_key"),
    ],
)
def test_missing_or_wrong_key_is_401_in_openai_shape(keyed_client, generator, headers, code):
    for method, path in [("post", GENERATIONS), ("get", "/v1/models"), ("get", "/v1/models/x")]:
        response = keyed_client.request(method, path, json={"prompt": "x"}, headers=headers)
        error = assert_openai_error(response, 401)
        assert error["code"] == code
        assert response.headers["www-authenticate"] == "Bearer"
        assert "sk-" not in response.text
    assert generator.jobs == []


def test_any_configured_key_is_accepted(keyed_client):
    for key in ("sk-first", "sk-second"):
        headers = {"authorization": f"Bearer {key}"}
        assert keyed_client.post(GENERATIONS, json={"prompt": "x"}, headers=headers).is_success


def test_health_and_image_files_stay_open(keyed_client):
    assert keyed_client.get("/health").status_code == 200
    created = keyed_client.post(
        GENERATIONS, json={"prompt": "x"}, headers={"authorization": "Bearer sk-first"}
    )
    url = created.json()["data"][0]["url"]
    assert keyed_client.get(url).status_code == 200  # the unguessable name is the capability


def test_openai_client_sends_its_key(keyed_client):
    api = openai.OpenAI(
        base_url="http://testserver/v1", api_key="sk-second", http_client=keyed_client
    )
    assert [model.id for model in api.models.list()] == ["tiny-sd3"]
    wrong = openai.OpenAI(
        base_url="http://testserver/v1", api_key="nope", http_client=keyed_client, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="x")


def test_keys_file_is_reread_when_it_changes(args, generator, store, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("# rotated monthly\nsk-old\n")
    client = TestClient(
        create_api(
            with_args(args, auth={"api_keys_file": str(keys)}), {"tiny-sd3": generator}, store
        )
    )
    old = {"authorization": "Bearer sk-old"}
    assert client.get("/v1/models", headers=old).status_code == 200
    keys.write_text("sk-new\n")
    os.utime(keys, (1, 1))  # a new mtime even within the file system's time resolution
    assert client.get("/v1/models", headers=old).status_code == 401
    assert client.get("/v1/models", headers={"authorization": "Bearer sk-new"}).status_code == 200


def keyed_by_file(args, generator, store, keys) -> TestClient:
    return TestClient(
        create_api(
            with_args(args, auth={"api_keys_file": str(keys)}), {"tiny-sd3": generator}, store
        )
    )


def accepted(client: TestClient, key: str) -> bool:
    response = client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
    assert response.status_code in (200, 401)
    return response.status_code == 200


def test_a_keys_file_rewritten_in_place_within_one_mtime_ends_with_its_final_keys(
    args, generator, store, tmp_path
):
    keys = tmp_path / "api-keys"
    keys.write_text("sk-old-key\n")
    client = keyed_by_file(args, generator, store, keys)
    assert accepted(client, "sk-old-key")
    same_mtime_ns = 1_700_000_000_000_000_000
    # A writer that truncates the file and writes it in two steps, both within one tick of
    # a coarse file system clock (forced here: both states get the very same mtime).
    with keys.open("w") as file:
        file.write("sk-new")
        file.flush()
        os.utime(keys, ns=(same_mtime_ns, same_mtime_ns))
        assert accepted(client, "sk-new")  # read mid-write: all the file held then
        file.write("-key\n")
    os.utime(keys, ns=(same_mtime_ns, same_mtime_ns))
    assert accepted(client, "sk-new-key")
    assert not accepted(client, "sk-new")  # the truncated key is not left in force
    assert not accepted(client, "sk-old-key")


def test_a_keys_file_that_changes_while_read_is_not_trusted(
    args, generator, store, tmp_path, monkeypatch
):
    keys = tmp_path / "api-keys"
    keys.write_text("sk-old-key\n")
    client = keyed_by_file(args, generator, store, keys)
    keys.write_text("sk-new-key\n")
    mtime_ns = keys.stat().st_mtime_ns
    real_read = Path.read_text

    def read_while_written(path: Path, *args, **kwargs) -> str:
        if path != keys:
            return real_read(path, *args, **kwargs)
        text = real_read(path, *args, **kwargs)[:6]  # the reader got "sk-new" ...
        with path.open("a") as file:  # ... as the writer went on (within one mtime tick)
            file.write("# rotated\n")
        os.utime(path, ns=(mtime_ns, mtime_ns))
        return text

    monkeypatch.setattr(Path, "read_text", read_while_written)
    assert not accepted(client, "sk-new")  # half a file is never in force
    assert accepted(client, "sk-old-key")  # the last good keys stay meanwhile
    monkeypatch.undo()
    assert accepted(client, "sk-new-key")  # and the next request reads it again
    assert not accepted(client, "sk-old-key")


def test_edits_need_a_key_too(keyed_client, generator):
    error = assert_openai_error(edit(keyed_client), 401)
    assert error["code"] == "missing_api_key"
    wrong = keyed_client.post(
        "/v1/images/edits",
        data={"prompt": "x"},
        files={"image": ("in.png", b"anything", "image/png")},
        headers={"authorization": "Bearer sk-wrong"},
    )
    assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
    assert generator.jobs == []
    keyed_client.headers["authorization"] = "Bearer sk-second"
    assert edit(keyed_client).status_code == 200
    assert len(generator.jobs) == 1


def test_auth_without_any_key_refuses_to_start(args, generator, store, monkeypatch, tmp_path):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    with pytest.raises(NoAPIKeys, match=KEYS_ENV):
        create_api(with_args(args, auth={"api_keys_env": KEYS_ENV}), {"tiny-sd3": generator}, store)
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(NoAPIKeys, match="empty"):
        create_api(
            with_args(args, auth={"api_keys_file": str(tmp_path / "empty")}),
            {"tiny-sd3": generator},
            store,
        )
    with pytest.raises(NoAPIKeys, match="cannot be read"):
        create_api(
            with_args(args, auth={"api_keys_file": str(tmp_path / "absent")}),
            {"tiny-sd3": generator},
            store,
        )


def test_key_parsing():
    assert parse_keys("a, b\n c\n# d\n\n") == ["a", "b", "c"]
    assert bearer_token("Bearer sk-1") == "sk-1"
    assert bearer_token("bearer  sk-1 ") == "sk-1"
    assert bearer_token("Token sk-1") is None
    assert bearer_token(None) is None


def test_body_over_the_limit_is_413_declared_or_not(args, generator, store):
    client = TestClient(
        create_api(
            with_args(args, limits={**args.limits.model_dump(), "max_body_bytes": 2048}),
            {"tiny-sd3": generator},
            store,
        )
    )
    big = {"prompt": "x" * 4000}
    error = assert_openai_error(client.post(GENERATIONS, json=big), 413)
    assert error["code"] == "request_too_large"

    def chunks():  # no content-length: the body is cut off as it streams in
        yield b'{"prompt": "'
        for _ in range(64):  # a whole MiB past the 2 KiB limit
            yield b"x" * (16 * 1024)
        yield b'"}'

    streamed = client.post(
        GENERATIONS, content=chunks(), headers={"content-type": "application/json"}
    )
    assert_openai_error(streamed, 413)
    assert generator.jobs == []
    assert client.post(GENERATIONS, json={"prompt": "x" * 1000}).status_code == 200


def test_timeout_is_504_in_openai_shape_and_cancels_the_generation(args, generator, store):
    generator.delay_s = 30
    client = TestClient(
        create_api(with_args(args, request_timeout_s=0.2), {"tiny-sd3": generator}, store)
    )
    response = client.post(GENERATIONS, json={"prompt": "x"})
    error = assert_openai_error(response, 504)
    assert error["code"] == "timeout"
    assert response.headers["x-should-retry"] == "false"
    assert generator.cancelled == generator.jobs and len(generator.jobs) == 1


def test_cors_is_off_by_default(client):
    preflight = client.options(
        GENERATIONS,
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    response = client.post(GENERATIONS, json={"prompt": "x"}, headers={"origin": "https://a.b"})
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_only_configured_origins(args, generator, store):
    allowed = "https://app.example.com"
    client = TestClient(
        create_api(
            with_args(args, cors={"allow_origins": [allowed]}), {"tiny-sd3": generator}, store
        )
    )
    preflight = client.options(
        GENERATIONS,
        headers={
            "origin": allowed,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == allowed
    response = client.post(GENERATIONS, json={"prompt": "x"}, headers={"origin": allowed})
    assert response.headers["access-control-allow-origin"] == allowed
    other = client.post(
        GENERATIONS, json={"prompt": "x"}, headers={"origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers
