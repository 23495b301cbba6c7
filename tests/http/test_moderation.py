"""Moderation on the ingress, in-process: the prompt blocklist (checked before any compute,
read again when its file changes), who may ask for `moderation: low`, and OpenAI's image
fields that these models serve or refuse naming them, never ignore."""

from __future__ import annotations

import hashlib
import os

import openai
import pytest
from fastapi.testclient import TestClient

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api

from .checks import assert_openai_error
from .fakes import FakeGenerator
from .test_edits import edit

GENERATIONS = "/v1/images/generations"
KEYS_ENV = "MODERATION_TEST_KEYS"
TRUSTED, OTHER = "trusted-key-1", "other-key-2"


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def with_args(args: AppArgs, **changes) -> AppArgs:
    return AppArgs.model_validate({**args.model_dump(), **changes})


def client_of(args: AppArgs, generator: FakeGenerator, store) -> TestClient:
    return TestClient(create_api(args, {"tiny-sd3": generator}, store))


@pytest.fixture
def blocklist(tmp_path):
    path = tmp_path / "blocklist.txt"
    path.write_text("# words this service refuses\n\nforbidden\\s+fruit\n")
    return path


def test_a_blocked_prompt_is_refused_before_any_compute(args, generator, store, blocklist):
    client = client_of(
        with_args(args, prompt_moderation={"blocklist_file": str(blocklist)}), generator, store
    )
    error = assert_openai_error(
        client.post(GENERATIONS, json={"prompt": "a FORBIDDEN  fruit on a table"}), 400, "prompt"
    )
    assert error["code"] == "moderation_blocked"
    error = assert_openai_error(
        client.post(GENERATIONS, json={"prompt": "a table", "negative_prompt": "forbidden fruit"}),
        400,
        "prompt",
    )
    assert_openai_error(edit(client, prompt="the forbidden fruit"), 400, "prompt")
    streamed = {"prompt": "forbidden fruit", "stream": True}
    assert_openai_error(client.post(GENERATIONS, json=streamed), 400, "prompt")
    assert generator.jobs == []
    assert client.post(GENERATIONS, json={"prompt": "a fruit"}).status_code == 200


def test_the_blocklist_is_read_again_when_it_changes_and_a_bad_one_keeps_the_last(
    args, generator, store, blocklist
):
    client = client_of(
        with_args(args, prompt_moderation={"blocklist_file": str(blocklist)}), generator, store
    )
    assert client.post(GENERATIONS, json={"prompt": "a red apple"}).status_code == 200
    blocklist.write_text("apple\n")
    assert_openai_error(client.post(GENERATIONS, json={"prompt": "a red apple"}), 400, "prompt")
    assert client.post(GENERATIONS, json={"prompt": "forbidden fruit"}).status_code == 200
    blocklist.write_text("apple\n(unclosed\n")  # a pattern that does not compile
    os.utime(blocklist, ns=(1, 1))  # a new signature even within one mtime tick
    assert_openai_error(client.post(GENERATIONS, json={"prompt": "a red apple"}), 400, "prompt")


def test_a_model_may_have_its_own_blocklist_in_place_of_the_applications(
    args, store, blocklist, tmp_path
):
    own = tmp_path / "own.txt"
    own.write_text("lighthouse\n")
    two = with_args(
        args,
        prompt_moderation={"blocklist_file": str(blocklist)},
        models=[
            args.model_dump()["models"][0],
            {"id": "strict", "prompt_moderation": {"blocklist_file": str(own)}},
        ],
    )
    default, strict = FakeGenerator(), FakeGenerator()
    client = TestClient(create_api(two, {"tiny-sd3": default, "strict": strict}, store))
    lighthouse = {"prompt": "a lighthouse"}
    assert client.post(GENERATIONS, json=lighthouse).status_code == 200
    assert_openai_error(
        client.post(GENERATIONS, json={**lighthouse, "model": "strict"}), 400, "prompt"
    )
    fruit = {"prompt": "forbidden fruit"}
    assert_openai_error(client.post(GENERATIONS, json=fruit), 400, "prompt")
    assert client.post(GENERATIONS, json={**fruit, "model": "strict"}).status_code == 200


def test_a_blocklist_that_cannot_be_read_fails_the_start_naming_the_key(args, tmp_path):
    broken = with_args(args, prompt_moderation={"blocklist_file": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match=r"prompt_moderation\.blocklist_file"):
        create_api(broken, {"tiny-sd3": FakeGenerator()})


def test_the_openai_client_sees_a_blocked_prompt_as_a_bad_request(args, store, blocklist):
    moderated = with_args(args, prompt_moderation={"blocklist_file": str(blocklist)})
    client = client_of(moderated, FakeGenerator(), store)
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    with pytest.raises(openai.BadRequestError) as raised:
        api.images.generate(model="tiny-sd3", prompt="forbidden fruit")
    assert raised.value.code == "moderation_blocked"


def safety_args(args: AppArgs, monkeypatch, **safety) -> AppArgs:
    monkeypatch.setenv(KEYS_ENV, f"{TRUSTED} {OTHER}")
    models = [{**args.model_dump()["models"][0], "safety": {"checker": "x", **safety}}]
    return with_args(args, models=models, auth={"api_keys_env": KEYS_ENV})


def generate_as(client: TestClient, key: str, **fields):
    headers = {"authorization": f"Bearer {key}"}
    return client.post(GENERATIONS, json={"prompt": "a fox", **fields}, headers=headers)


def test_moderation_low_only_where_configured_and_for_the_keys_allowed(
    args, generator, store, monkeypatch
):
    # No relaxed thresholds: `low` is refused, naming it.
    client = client_of(safety_args(args, monkeypatch), generator, store)
    assert_openai_error(generate_as(client, OTHER, moderation="low"), 400, "moderation")
    relaxed = safety_args(
        args, monkeypatch, low_thresholds={"nsfw": 0.9}, low_key_sha256=[sha256(TRUSTED)]
    )
    client = client_of(relaxed, generator, store)
    error = assert_openai_error(generate_as(client, OTHER, moderation="low"), 400, "moderation")
    assert error["code"] == "moderation_not_allowed"
    assert generate_as(client, OTHER, moderation="auto").status_code == 200
    assert generate_as(client, TRUSTED, moderation="low").status_code == 200
    assert [job.moderation for job in generator.jobs] == ["auto", "low"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"background": "transparent"}, "background"),
        ({"style": "vivid"}, "style"),
        ({"output_compression": 50}, "output_compression"),  # png: lossless
        ({"output_compression": 50, "output_format": "png"}, "output_compression"),
    ],
)
def test_openai_fields_these_models_cannot_honour_are_a_400_naming_them(
    client, generator, fields, param
):
    response = client.post(GENERATIONS, json={"prompt": "x", **fields})
    assert assert_openai_error(response, 400, param)["code"] == "unsupported_parameter"
    assert generator.jobs == []


def test_openai_fields_these_models_can_honour_are_served(client, generator):
    for fields in (
        {"background": "opaque"},
        {"background": "auto", "moderation": "auto"},
        {"output_compression": 40, "output_format": "jpeg"},
        {"safety_identifier": "hashed-user-7"},
    ):
        response = client.post(GENERATIONS, json={"prompt": "x", **fields})
        assert response.status_code == 200, (fields, response.text)


def test_input_fidelity_sets_an_edits_strength_and_never_with_strength(client, generator):
    assert edit(client, input_fidelity="high").status_code == 200
    assert edit(client, input_fidelity="low").status_code == 200
    assert [job.strength for job in generator.jobs] == [0.5, 0.8]  # high, then the default
    assert_openai_error(edit(client, input_fidelity="high", strength=0.3), 400, "input_fidelity")
