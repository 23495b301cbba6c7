"""Per-key quotas over a real Redis: rate limits, the image-steps budget and concurrency, as
429s in the API's error shape with OpenAI's headers, counted alike by every ingress."""

from __future__ import annotations

import asyncio
import time

import anyio
import httpx
import openai
import pytest

from deployments.ingress.errors import service_unavailable
from deployments.ingress.quotas import format_duration

from .checks import assert_openai_error
from .quota_apps import (
    GENERATIONS,
    KEYS,
    QuotaCounts,
    bearer,
    call_asgi,
    generate,
    quota_app,
    quota_app_builder,
    quota_args,
    quota_client,
    sha256,
)


@pytest.fixture
def quota_api(args, generator, store, monkeypatch, redis_server):
    """Builds the app with `quotas` over the session's Redis."""
    return quota_app_builder(args, generator, store, monkeypatch, redis_server.url)


def test_reset_times_are_written_as_openai_writes_them():
    assert [format_duration(ms) for ms in (0, 850, 1000, 12_500, 60_000, 61_250, 360_000)] == [
        "0ms", "850ms", "1s", "12.5s", "1m0s", "1m1.25s", "6m0s"
    ]  # fmt: skip


def wait_for_reset(response: httpx.Response) -> None:
    time.sleep(int(response.headers["retry-after-ms"]) / 1000 + 0.05)


def test_no_quotas_without_their_config_and_no_redis_needed(args, generator, store, monkeypatch):
    keyed = quota_args(args, monkeypatch, "redis://127.0.0.1:1/0")
    keyed = keyed.model_copy(update={"auth": keyed.auth.model_copy(update={"quotas": None})})
    client = quota_client(quota_app(keyed, generator, store))
    for _ in range(5):
        response = generate(client)
        assert response.status_code == 200
        assert not [name for name in response.headers if name.startswith("x-ratelimit")]


def test_the_request_past_the_limit_is_a_429_with_openais_headers_until_the_reset(
    generator, quota_api
):
    quotas = {"window_s": 2, "default": {"requests": 3}}
    client = quota_client(quota_api(**quotas))
    remaining = []
    for _ in range(3):
        response = generate(client)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(response.headers["x-ratelimit-remaining-requests"])
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == ["2", "1", "0"]
    refused = generate(client)
    error = assert_openai_error(refused, 429)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-should-retry"] == "true"
    assert 1 <= int(refused.headers["retry-after"]) <= 2
    assert 0 < int(refused.headers["retry-after-ms"]) <= 2000
    assert len(generator.jobs) == 3  # the refused request never reached the generator
    assert client.get("/v1/models", headers=bearer("alice")).status_code == 200  # not counted
    wait_for_reset(refused)
    again = generate(client)
    assert again.status_code == 200
    assert again.headers["x-ratelimit-remaining-requests"] == "2"


def test_each_key_counts_apart_and_a_named_key_has_its_own_limits(quota_api):
    quotas = {"default": {"requests": 1}, "keys": [{"name": "alice", "requests": 2}]}
    client = quota_client(quota_api(**quotas))
    statuses = {
        key: [generate(client, key).status_code for _ in range(3)]
        for key in ("alice", "bob", "carol")
    }
    assert statuses == {"alice": [200, 200, 429], "bob": [200, 429, 429], "carol": [200, 429, 429]}


def test_the_image_steps_budget_charges_each_request_its_output_tokens(quota_api):
    quotas = {"default": {"image_steps": 10}}
    client = quota_client(quota_api(**quotas))
    first = generate(client, n=2, num_inference_steps=3)
    assert first.status_code == 200
    assert first.json()["usage"]["output_tokens"] == 6
    assert first.headers["x-ratelimit-limit-tokens"] == "10"
    assert first.headers["x-ratelimit-remaining-tokens"] == "4"
    refused = generate(client, n=2, num_inference_steps=3)
    error = assert_openai_error(refused, 429)
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert refused.headers["x-ratelimit-remaining-tokens"] == "4"
    assert refused.headers["x-should-retry"] == "true"
    fits = generate(client, n=1, num_inference_steps=4)
    assert fits.status_code == 200
    assert fits.headers["x-ratelimit-remaining-tokens"] == "0"


def test_a_request_larger_than_the_whole_budget_is_a_429_not_to_retry(quota_api):
    metrics = QuotaCounts()
    quotas = {"default": {"image_steps": 10}}
    app = quota_api(metrics, **quotas)
    refused = generate(quota_client(app), n=3, num_inference_steps=4)
    error = assert_openai_error(refused, 429)
    assert "12 image-steps" in error["message"]
    assert refused.headers["x-should-retry"] == "false"
    assert "retry-after" not in refused.headers
    api = openai.OpenAI(
        base_url="http://testserver/v1", api_key=KEYS["alice"], http_client=quota_client(app)
    )
    with pytest.raises(openai.RateLimitError):
        api.images.generate(prompt="a fox", n=3, extra_body={"num_inference_steps": 4})
    assert metrics.requests == {("alice", "too_large"): 2}  # the client did not retry


def test_the_openai_client_waits_out_retry_after_and_succeeds(quota_api):
    metrics = QuotaCounts()
    quotas = {"window_s": 1, "default": {"requests": 1}}
    app = quota_api(metrics, **quotas)
    api = openai.OpenAI(
        base_url="http://testserver/v1", api_key=KEYS["alice"], http_client=quota_client(app)
    )
    api.images.generate(prompt="a fox")
    second = api.images.generate(prompt="a fox")  # refused once, then retried after the reset
    assert second.data
    assert metrics.requests[("alice", "admitted")] == 2
    assert metrics.requests[("alice", "requests")] >= 1


def test_two_ingress_apps_share_the_counts(redis_server, quota_api):
    first = quota_client(quota_api(default={"requests": 4}))
    second = quota_client(quota_api(default={"requests": 4}))
    statuses = [generate(client).status_code for client in (first, second) * 3]
    assert statuses == [200, 200, 200, 200, 429, 429]
    with redis_server.client() as redis:
        # One hash-tagged key per key and window (Redis Cluster keeps a tag on one node),
        # named by the key's digest, never the key.
        (window,) = redis.keys("*")
    digest = sha256(KEYS["alice"])[:32]
    assert window.decode() == f"image-service:quota:{{{digest}}}:window"


def test_metrics_count_each_key_by_its_name_never_its_secret_and_cap_the_labels(quota_api):
    metrics = QuotaCounts()
    quotas = {"default": {"requests": 1}, "max_metric_keys": 2}
    app = quota_api(metrics, **quotas)
    client = quota_client(app)
    for key in ("alice", "alice", "bob", "carol"):
        generate(client, key, n=2, num_inference_steps=3)
    (bob,) = {label for label, _ in metrics.requests} - {"alice", "other"}
    assert bob.startswith("key-") and len(bob) == 12
    assert metrics.requests == {
        ("alice", "admitted"): 1,
        ("alice", "requests"): 1,
        (bob, "admitted"): 1,
        ("other", "admitted"): 1,  # carol: past the cap of 2 labels
    }
    assert metrics.image_steps == {"alice": 6, bob: 6, "other": 6}
    assert not any("sk-" in label for label in metrics.image_steps)


async def _concurrent(client: httpx.AsyncClient, count: int, **body) -> list[httpx.Response]:
    return await asyncio.gather(
        *(
            client.post(GENERATIONS, json={"prompt": "a fox", **body}, headers=bearer("alice"))
            for _ in range(count)
        )
    )


def test_the_concurrency_limit_refuses_a_request_past_it_and_frees_slots_when_done(
    generator, redis_server, quota_api
):
    generator.delay_s = 0.5
    quotas = {"default": {"concurrent_requests": 2}}
    app = quota_api(**quotas)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            crowd = await _concurrent(client, 3)
            later = await _concurrent(client, 2)
        return crowd, later

    crowd, later = asyncio.run(scenario())
    assert sorted(response.status_code for response in crowd) == [200, 200, 429]
    (refused,) = [response for response in crowd if response.status_code == 429]
    assert assert_openai_error(refused, 429)["code"] == "concurrency_limit_exceeded"
    assert refused.headers["x-should-retry"] == "true"
    assert refused.headers["retry-after"] == "1"
    assert [response.status_code for response in later] == [200, 200]
    with redis_server.client() as redis:
        assert redis.keys("*:slots") == []  # every slot released (Redis drops an empty set)


def test_a_slot_is_freed_when_its_request_fails(generator, quota_api):
    quotas = {"default": {"concurrent_requests": 1}}
    client = quota_client(quota_api(**quotas))
    generator.fail_with = service_unavailable("replica lost")
    assert [generate(client).status_code for _ in range(3)] == [503, 503, 503]
    assert [generate(client, stream=True).status_code for _ in range(2)] == [503, 503]
    generator.fail_with = None
    assert generate(client).status_code == 200


def test_a_slot_is_freed_when_a_stream_fails_midway(
    args, generator, store, monkeypatch, redis_server
):
    keyed = quota_args(args, monkeypatch, redis_server.url, default={"concurrent_requests": 1})
    keyed = keyed.model_copy(update={"request_timeout_s": 0.5})
    client = quota_client(quota_app(keyed, generator, store))
    generator.delay_s = 2.0
    timed_out = generate(client, stream=True, num_inference_steps=10, stream_progress=True)
    assert timed_out.status_code == 200 and "event: error" in timed_out.text
    generator.delay_s = 0
    assert generate(client).status_code == 200


def test_a_slot_is_freed_when_the_client_leaves_a_stream(generator, quota_api):
    generator.delay_s = 3.0
    quotas = {"default": {"concurrent_requests": 1}}
    app = quota_api(**quotas)
    body = {"stream": True, "stream_progress": True, "num_inference_steps": 20}
    status, _, _ = asyncio.run(call_asgi(app, "alice", body, leave_once_started=True))
    assert status == 200
    assert generator.cancelled == generator.jobs  # the generation stopped with the client
    generator.delay_s = 0
    status, headers, _ = asyncio.run(call_asgi(app, "alice", {}))
    assert status == 200, headers


async def _cancelled_by_task(app, body) -> None:
    task = asyncio.ensure_future(call_asgi(app, "alice", body))
    await asyncio.sleep(0.3)
    task.cancel()  # Ray Serve's proxy cancels the request's task when its client leaves
    with pytest.raises(asyncio.CancelledError):
        await task


async def _cancelled_by_scope(app, body) -> None:
    with anyio.move_on_after(0.3):  # a server's cancel scope: every later await is cancelled
        await call_asgi(app, "alice", body)


@pytest.mark.parametrize("cancel", [_cancelled_by_task, _cancelled_by_scope], ids=["task", "scope"])
def test_a_slot_is_freed_when_the_request_is_cancelled(generator, cancel, quota_api):
    generator.delay_s = 3.0
    quotas = {"default": {"concurrent_requests": 1}}
    app = quota_api(**quotas)
    asyncio.run(cancel(app, {}))
    assert generator.cancelled == generator.jobs != []
    generator.delay_s = 0
    status, _, _ = asyncio.run(call_asgi(app, "alice", {}))
    assert status == 200


def test_a_cancelled_requests_slot_is_freed_even_when_redis_is_slow_to_answer(
    generator, redis_server, quota_api
):
    """Under a server's cancel scope every await of a cancelled request is cancelled, the
    release's too, unless it is shielded; a release cancelled while Redis holds its command
    drops the connection, and the command with it."""
    generator.delay_s = 3.0
    app = quota_api(default={"concurrent_requests": 1}, store_timeout_s=2.0)

    def pause_redis_writes() -> None:
        with redis_server.client() as redis:
            redis.execute_command("CLIENT", "PAUSE", 300, "WRITE")

    async def leave_while_redis_is_paused() -> None:
        async def pause_soon() -> None:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(pause_redis_writes)

        pausing = asyncio.ensure_future(pause_soon())
        with anyio.move_on_after(0.3):
            await call_asgi(app, "alice", {})
        await pausing

    asyncio.run(leave_while_redis_is_paused())
    assert generator.cancelled == generator.jobs != []
    generator.delay_s = 0
    status, _, _ = asyncio.run(call_asgi(app, "alice", {}))
    assert status == 200
