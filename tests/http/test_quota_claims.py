"""Claims of the quotas that only concurrency or another route can break, over a real Redis:
the request and image-step windows are decided atomically (concurrent admissions never
admit past a limit), edits count against a key's limits as generations do, and a store
that fails refuses requests by default (`on_store_error` defaults to `closed`)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from deployments.config.quota_config import KeyLimits, QuotaConfig
from deployments.ingress.quota_store import RedisQuotaStore

from .checks import assert_openai_error
from .quota_apps import bearer, generate, quota_app_builder, quota_client
from .test_edits import png

CROWD = 40


def store_for(redis_url: str, window_s: float = 60.0) -> RedisQuotaStore:
    return RedisQuotaStore(
        redis_url,
        None,
        timeout_s=5.0,
        prefix=f"claims-{uuid.uuid4().hex}:",
        window_s=window_s,
        slot_ttl_s=60.0,
    )


async def admit_at_once(store: RedisQuotaStore, limits: KeyLimits, cost: int) -> list:
    """`CROWD` admissions of one key sent together (each its own connection from the pool,
    interleaving at Redis as concurrent ingresses would)."""
    return await asyncio.gather(
        *(store.admit("key-1", limits, cost, slot_id=f"slot-{i}") for i in range(CROWD))
    )


@pytest.mark.parametrize(
    "limits, cost, admitted, refused_by",
    [
        (KeyLimits(requests=7), 1, 7, "requests"),
        (KeyLimits(image_steps=100), 30, 3, "image_steps"),
        (KeyLimits(requests=20, image_steps=250), 50, 5, "image_steps"),
    ],
    ids=["requests", "image-steps", "both"],
)
def test_concurrent_admissions_never_pass_a_window_limit(
    redis_server, limits, cost, admitted, refused_by
):
    async def scenario():
        return await admit_at_once(store_for(redis_server.url), limits, cost)

    counts = asyncio.run(scenario())
    passed = [each for each in counts if each.refused is None]
    assert len(passed) == admitted
    assert {each.refused for each in counts if each.refused is not None} == {refused_by}
    # Each admitted request saw its own count: no two read the same one.
    assert sorted(each.requests for each in passed) == list(range(1, admitted + 1))


@pytest.fixture
def quota_api(args, generator, store, monkeypatch, redis_server):
    return quota_app_builder(args, generator, store, monkeypatch, redis_server.url)


def edit_as(client, key: str = "alice"):
    files = {"image": ("in.png", png(64, 32), "image/png")}
    data = {"prompt": "make it blue", "strength": "1.0", "num_inference_steps": "4"}
    return client.post("/v1/images/edits", data=data, files=files, headers=bearer(key))


def test_edits_count_against_the_keys_request_limit_with_generations(generator, quota_api):
    client = quota_client(quota_api(default={"requests": 3}))
    assert edit_as(client).status_code == 200
    assert generate(client).status_code == 200
    assert edit_as(client).status_code == 200
    refused = edit_as(client)
    error = assert_openai_error(refused, 429)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert len(generator.jobs) == 3  # the refused edit never reached the generator


def test_edits_are_charged_their_image_steps(generator, quota_api):
    client = quota_client(quota_api(default={"image_steps": 10}))
    first = edit_as(client)  # 1 image x 4 steps at strength 1.0
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-tokens"] == "6"
    assert edit_as(client).status_code == 200  # 8 of 10
    refused = edit_as(client)
    error = assert_openai_error(refused, 429)
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert len(generator.jobs) == 2


def test_the_default_when_redis_fails_is_to_refuse(generator, own_redis, args, store, monkeypatch):
    assert QuotaConfig.model_fields["on_store_error"].default == "closed"
    build = quota_app_builder(args, generator, store, monkeypatch, own_redis.url)
    client = quota_client(build(default={"requests": 100}))  # on_store_error not given
    assert generate(client).status_code == 200
    own_redis.stop()
    refused = generate(client)
    error = assert_openai_error(refused, 503)
    assert error["code"] == "quota_store_unavailable"
    assert len(generator.jobs) == 1  # nothing ran uncounted
