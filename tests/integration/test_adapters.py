"""LoRA adapters through real Ray Serve and real HTTP, on the embedded tiny-sd3 and its
embedded adapters: listed, routed by model multiplexing to the replica that holds them, and
never leaking into another request, even when sent at the same time."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from ray import serve

from deployments.config.model_config import generator_deployment_name
from serve_app import build_app

pytestmark = pytest.mark.integration

APP = "adapters"
ARGS = {
    "models": [
        {
            "id": "tiny-sd3",
            "source": "embedded:tiny-sd3",
            "device": "cpu",
            "default_size": "32x32",
            "default_steps": 2,
            "adapters": [
                {"id": "ink", "source": "embedded:tiny-sd3/ink"},
                {"id": "paper", "source": "embedded:tiny-sd3/paper", "scale": 0.8},
                # Made for FLUX: its weights do not fit SD3's modules.
                {"id": "misfit", "source": "embedded:tiny-flux/ink"},
                # Used by the routing test alone.
                {"id": "ink-2", "source": "embedded:tiny-sd3/ink", "scale": 0.5},
            ],
            "max_adapters_per_replica": 2,
            # Each request alone in its call (two calls at once per replica), so that its
            # bytes can be compared with its bytes alone: a batch of adapter jobs may differ
            # by one level in a few pixels (float sums in another order; batched adapter
            # jobs are compared within that in tests/pipeline/test_adapters.py).
            "batching": {"max_batch_images": 1},
            "worker_threads": 2,
            "deployment": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}},
        }
    ],
    "limits": {"max_pixels": 64 * 64, "max_steps": 10},
}


@pytest.fixture(scope="module")
def base_url(serve_url):
    serve.run(build_app(ARGS), name=APP, route_prefix=f"/{APP}")
    yield f"{serve_url}/{APP}"
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def generate(client: openai.OpenAI, model: str = "tiny-sd3", **extra) -> bytes:
    result = client.images.generate(
        model=model,
        prompt="a lighthouse",
        response_format="b64_json",
        extra_body={"seed": 7, **extra},
    )
    return base64.b64decode(result.data[0].b64_json)


def replica_counters() -> dict[int, dict]:
    """Each generator replica's counters, by pid (calls land on replicas at random)."""
    handle = serve.get_deployment_handle(generator_deployment_name("tiny-sd3"), APP)
    seen: dict[int, dict] = {}
    for _ in range(60):
        counters = handle.counters.remote().result(timeout_s=30)
        seen[counters["pid"]] = counters
        if len(seen) == 2:
            break
    return seen


def test_adapters_are_listed_as_models_of_their_parent(base_url):
    listed = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]
    parents = {card["id"]: card.get("parent") for card in listed}
    assert parents == {
        "tiny-sd3": None,
        "ink": "tiny-sd3",
        "paper": "tiny-sd3",
        "misfit": "tiny-sd3",
        "ink-2": "tiny-sd3",
    }


def test_adapter_and_base_requests_sent_together_each_give_their_bytes_alone(client):
    requests = {
        "base": {},
        "ink": {"model": "ink"},
        "paper": {"lora": [{"name": "paper"}]},
        "composed": {"lora": [{"name": "ink", "scale": 0.7}, {"name": "paper", "scale": 0.5}]},
    }
    alone = {name: generate(client, **request) for name, request in requests.items()}
    assert len(set(alone.values())) == 4, "each adapter set changes the image"
    together = [name for name in requests for _ in range(3)]
    with ThreadPoolExecutor(len(together)) as pool:
        answers = list(pool.map(lambda name: generate(client, **requests[name]), together))
    matches = [answer == alone[name] for name, answer in zip(together, answers, strict=True)]
    assert matches == [True] * 12
    # No residue: the base model after all of them is the base model before.
    assert generate(client) == alone["base"]


def test_scale_zero_is_the_base_and_composed_differs_from_each_alone(client):
    base = generate(client)
    assert generate(client, lora=[{"name": "ink", "scale": 0}]) == base
    ink, paper = generate(client, model="ink"), generate(client, model="paper")
    composed = generate(client, model="ink", lora=[{"name": "paper"}])
    assert len({base, ink, paper, composed}) == 4


def test_requests_for_an_adapter_go_to_the_replica_that_holds_it(client):
    loads_before = sum(c["adapters"]["loads"] for c in replica_counters().values())
    first = generate(client, model="ink-2")
    time.sleep(6)  # the replica tells Serve's controller, which tells the routers
    for _ in range(6):  # one at a time: routing, not load, decides the replica
        assert generate(client, model="ink-2") == first
    after = replica_counters()
    holders = [pid for pid, c in after.items() if "ink-2" in c["adapters"]["loaded"]]
    loads = sum(c["adapters"]["loads"] for c in after.values()) - loads_before
    # With random routing, 6 requests over 2 replicas would miss the holder ~98% of the time.
    assert (len(holders), loads) == (1, 1), after


def test_an_adapter_that_does_not_fit_is_refused_and_the_replica_stays_healthy(client, base_url):
    base = generate(client)
    with pytest.raises(openai.BadRequestError) as refused:
        generate(client, model="misfit")
    error = refused.value.body
    assert error["code"] == "adapter_unavailable" and "misfit" in error["message"]
    assert generate(client) == base
    assert generate(client, model="ink") == generate(client, model="ink")
    status = serve.status().applications[APP].deployments[generator_deployment_name("tiny-sd3")]
    assert status.status == "HEALTHY"
