"""LoRA adapters through the in-process app: listed as models, chosen by `model` or composed
with `lora`, and every wrong use a 404 or 400 naming the field (fake generators)."""

from __future__ import annotations

import json
from dataclasses import replace

import openai
import pytest
from fastapi.testclient import TestClient

from deployments import adapter_directory
from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api
from deployments.jobs import AdapterUnavailable

from .checks import assert_openai_error
from .fakes import FakeGenerator
from .test_edits import edit

GENERATIONS = "/v1/images/generations"


@pytest.fixture
def args() -> AppArgs:
    return AppArgs.model_validate(
        {
            "models": [
                {
                    "id": "tiny-sd3",
                    "adapters": [
                        {"id": "ink", "source": "embedded:tiny-sd3/ink"},
                        {"id": "paper", "source": "embedded:tiny-sd3/paper", "scale": 0.5},
                        {"id": "wood", "source": "/adapters/wood"},
                    ],
                    "max_adapters_per_request": 2,
                    "min_adapter_scale": -1.0,
                    "max_adapter_scale": 1.5,
                },
                {
                    "id": "tiny-flux",
                    "source": "embedded:tiny-flux",
                    "adapters": [{"id": "flux-ink", "source": "embedded:tiny-flux/ink"}],
                },
            ],
        }
    )


@pytest.fixture
def generators() -> dict[str, FakeGenerator]:
    return {"tiny-sd3": FakeGenerator(), "tiny-flux": FakeGenerator()}


@pytest.fixture
def client(args, generators, store) -> TestClient:
    return TestClient(create_api(args, generators, store), raise_server_exceptions=False)


def generate(client: TestClient, **body):
    return client.post(GENERATIONS, json={"prompt": "a fox", "seed": 1, **body})


def test_models_lists_each_adapter_with_its_base_model_as_parent(client):
    listed = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert {name: card["parent"] for name, card in listed.items()} == {
        "tiny-sd3": None,
        "tiny-flux": None,
        "ink": "tiny-sd3",
        "paper": "tiny-sd3",
        "wood": "tiny-sd3",
        "flux-ink": "tiny-flux",
    }
    assert client.get("/v1/models/paper").json()["parent"] == "tiny-sd3"


def test_model_naming_an_adapter_runs_on_its_base_model_at_the_configured_scale(client, generators):
    assert generate(client, model="paper").status_code == 200
    (job,) = generators["tiny-sd3"].jobs
    assert job.adapters == (("paper", 0.5),)
    assert generators["tiny-flux"].jobs == []


def test_lora_composes_adapters_sorted_with_their_scales(client, generators):
    response = generate(client, lora=[{"name": "wood", "scale": 0.8}, {"name": "ink"}])
    assert response.status_code == 200, response.text
    assert generators["tiny-sd3"].jobs[0].adapters == (("ink", 1.0), ("wood", 0.8))


def test_an_adapter_model_and_lora_combine(client, generators):
    assert generate(client, model="ink", lora=[{"name": "paper", "scale": 1.5}]).status_code == 200
    assert generators["tiny-sd3"].jobs[0].adapters == (("ink", 1.0), ("paper", 1.5))


def test_scale_zero_is_the_base_model(client, generators):
    assert generate(client, lora=[{"name": "ink", "scale": 0}]).status_code == 200
    assert generate(client).status_code == 200
    with_zero, base = generators["tiny-sd3"].jobs
    assert with_zero.adapters == ()
    assert replace(with_zero, request_id="") == replace(base, request_id="")


def test_streams_and_edits_carry_their_adapters(client, generators):
    response = client.post(
        GENERATIONS, json={"prompt": "a fox", "model": "ink", "stream": True, "partial_images": 1}
    )
    assert response.status_code == 200 and "image_generation.completed" in response.text
    assert edit(client, lora=json.dumps([{"name": "paper", "scale": 0.25}])).status_code == 200
    streamed, edited = generators["tiny-sd3"].jobs
    assert streamed.adapters == (("ink", 1.0),)
    assert edited.task == "image-to-image" and edited.adapters == (("paper", 0.25),)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "no-such-adapter"}, "model"),
        ({"lora": [{"name": "no-such-adapter"}]}, "lora.0.name"),
        ({"lora": [{"name": "ink"}, {"name": "nope", "scale": 1}]}, "lora.1.name"),
    ],
)
def test_an_unknown_adapter_is_a_404_naming_the_field(client, generators, body, param):
    error = assert_openai_error(generate(client, **body), 404, param)
    assert error["code"] == "model_not_found"
    assert generators["tiny-sd3"].jobs == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"lora": [{"name": "ink", "scale": 1.6}]}, "lora.0.scale"),  # > max_adapter_scale
        ({"lora": [{"name": "ink"}, {"name": "paper", "scale": -1.5}]}, "lora.1.scale"),
        ({"lora": [{"name": "ink"}, {"name": "paper"}, {"name": "wood"}]}, "lora"),  # 3 > 2
        ({"model": "ink", "lora": [{"name": "paper"}, {"name": "wood"}]}, "lora"),  # 3 in all
        ({"lora": [{"name": "flux-ink"}]}, "lora.0.name"),  # another model's adapter
        ({"model": "flux-ink", "lora": [{"name": "ink"}]}, "lora.0.name"),
        ({"model": "ink", "lora": [{"name": "ink"}]}, "lora.0.name"),  # twice
        ({"lora": [{"name": "ink"}, {"name": "ink"}]}, "lora.1.name"),
        ({"lora": [{"name": "ink", "scale": "1"}]}, "lora.0.scale"),  # JSON strictly
        ({"lora": [{"name": "ink", "weight": 1}]}, "lora.0.weight"),
        ({"lora": [{"name": ""}]}, "lora.0.name"),
        ({"lora": {"name": "ink"}}, "lora"),
        ({"lora": "ink"}, "lora"),
    ],
)
def test_a_wrong_use_of_adapters_is_a_400_naming_the_field(client, generators, body, param):
    assert_openai_error(generate(client, **body), 400, param)
    assert all(generator.jobs == [] for generator in generators.values())


def test_an_edit_with_unreadable_lora_text_is_a_400_naming_lora(client):
    assert_openai_error(edit(client, lora="[{name: ink}"), 400, "lora")


def test_an_adapter_the_replica_cannot_load_is_a_400_naming_it(client, generators):
    # What the generator client turns a replica's `AdapterUnavailable` into (see
    # tests/unit/test_generator_errors.py); here the backend raises the API's answer itself.
    from deployments.ingress.deployment import generator_errors_as_api_errors

    class Refusing(FakeGenerator):
        async def generate(self, job):
            with generator_errors_as_api_errors(job.request_id):
                raise AdapterUnavailable("ink", "its weights do not fit the model")

    generators["tiny-sd3"].__class__ = Refusing
    error = assert_openai_error(generate(client, model="ink"), 400, "model")
    assert error["code"] == "adapter_unavailable" and "'ink'" in error["message"]


def test_the_openai_client_picks_adapters_by_model_and_extra_body(client, generators):
    sdk = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=client)
    sdk.images.generate(model="ink", prompt="a fox", response_format="b64_json")
    sdk.images.generate(
        model="tiny-sd3",
        prompt="a fox",
        response_format="b64_json",
        extra_body={"lora": [{"name": "paper", "scale": 0.75}, {"name": "wood"}]},
    )
    first, second = generators["tiny-sd3"].jobs
    assert first.adapters == (("ink", 1.0),)
    assert second.adapters == (("paper", 0.75), ("wood", 1.0))


def test_adapters_dropped_into_the_watched_directory_are_served_without_a_redeploy(
    tmp_path, generators, store, monkeypatch
):
    monkeypatch.setattr(adapter_directory, "RESCAN_S", 0.0)
    args = AppArgs.model_validate(
        {"models": [{"id": "tiny-sd3", "adapter_directory": str(tmp_path / "adapters")}]}
    )
    client = TestClient(create_api(args, {"tiny-sd3": generators["tiny-sd3"]}, store))
    assert_openai_error(generate(client, model="drop"), 404, "model")
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "drop.safetensors").write_bytes(b"weights")
    listed = {card["id"]: card["parent"] for card in client.get("/v1/models").json()["data"]}
    assert listed == {"tiny-sd3": None, "drop": "tiny-sd3"}
    assert generate(client, model="drop").status_code == 200
    assert generate(client, lora=[{"name": "drop", "scale": 0.5}]).status_code == 200
    assert [job.adapters for job in generators["tiny-sd3"].jobs] == [
        (("drop", 1.0),),
        (("drop", 0.5),),
    ]


def test_scales_are_rounded_to_two_decimals_so_near_equal_requests_share_a_set(client, generators):
    for scale in (0.501, 0.4999, 0.001):
        assert generate(client, lora=[{"name": "ink", "scale": scale}]).status_code == 200
    assert [job.adapters for job in generators["tiny-sd3"].jobs] == [
        (("ink", 0.5),),
        (("ink", 0.5),),
        (),  # 0.001 rounds to 0: the base model
    ]


@pytest.mark.parametrize(
    "text",
    [
        "[" * 3000 + "]" * 3000,  # nested past Python's recursion limit, under the cap
        "[" * 5000,  # past the length cap
        '[{"name": "ink", "scale": true}]',  # JSON taken strictly, in a form too
        '[{"name": "ink", "scale": "0.5"}]',
        '[{"name": 7}]',
    ],
)
def test_an_edit_with_a_bad_lora_field_is_a_400_naming_it(client, text):
    assert_openai_error(edit(client, lora=text), 400, "lora")


def test_an_adapter_id_with_a_dot_is_refused_by_the_config():
    # peft cannot name an adapter with a `.`; such an id could never load.
    with pytest.raises(ValueError, match="adapters"):
        AppArgs.model_validate(
            {"models": [{"adapters": [{"id": "ink.v2", "source": "/adapters/ink"}]}]}
        )
