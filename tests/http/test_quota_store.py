"""The quotas when their Redis fails: closed (503, retryable) or open (admitted, counted),
a restart under load, and a Redis URL that cannot work, refused at start."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
from pydantic import ValidationError

from deployments.config.app_config import AppArgs
from deployments.config.quota_config import KeyLimits
from deployments.ingress.quota_store import RedisQuotaStore
from tests.redis_server import RedisServer

from .checks import assert_openai_error
from .quota_apps import (
    GENERATIONS,
    KEYS,
    QuotaCounts,
    bearer,
    generate,
    quota_app,
    quota_app_builder,
    quota_args,
    quota_client,
    sha256,
)


@pytest.fixture
def quota_api(args, generator, store, monkeypatch, own_redis):
    """Builds the app with `quotas` over the test's own Redis."""
    return quota_app_builder(args, generator, store, monkeypatch, own_redis.url)


def test_fail_closed_answers_a_retryable_503_while_redis_is_down(generator, own_redis, quota_api):
    metrics = QuotaCounts()
    quotas = {"default": {"requests": 100}, "on_store_error": "closed"}
    app = quota_api(metrics, **quotas)
    client = quota_client(app)
    assert generate(client).status_code == 200
    own_redis.stop()
    refused = generate(client)
    error = assert_openai_error(refused, 503)
    assert (error["type"], error["code"]) == ("server_error", "quota_store_unavailable")
    assert (refused.headers["x-should-retry"], refused.headers["retry-after"]) == ("true", "1")
    assert len(generator.jobs) == 1
    assert metrics.store_errors == {"admit": 1}
    own_redis.start()
    assert generate(client).status_code == 200


def test_fail_open_admits_uncounted_logs_and_counts_while_redis_is_down(
    own_redis, caplog, quota_api
):
    metrics = QuotaCounts()
    quotas = {"default": {"requests": 1}, "on_store_error": "open"}
    app = quota_api(metrics, **quotas)
    client = quota_client(app)
    assert generate(client).status_code == 200
    assert generate(client).status_code == 429
    own_redis.stop()
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        answers = [generate(client) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert not [name for name in answers[0].headers if name.startswith("x-ratelimit")]
    assert metrics.requests[("alice", "unchecked")] == 3
    assert metrics.store_errors == {"admit": 3}
    warnings = [r for r in caplog.records if "quota store unavailable" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not once a request
    own_redis.start()  # empty again: the limit counts afresh
    assert [generate(client).status_code for _ in range(2)] == [200, 429]


def _answer_is_acceptable(response: httpx.Response) -> bool:
    if response.status_code == 200:
        return len(response.json()["data"]) == 2  # answered 200: its images are there
    retryable = response.headers.get("x-should-retry") == "true"
    code = response.json()["error"]["code"]
    return retryable and (response.status_code, code) in {
        (503, "quota_store_unavailable"),
        (429, "concurrency_limit_exceeded"),
    }


def test_a_redis_restart_under_load_loses_no_answer_and_the_limits_work_after(
    generator, own_redis, quota_api
):
    generator.delay_s = 0.05
    quotas = {
        "default": {"requests": 2},
        "keys": [{"name": "alice", "requests": 100_000, "concurrent_requests": 6}],
    }
    app = quota_api(**quotas)

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        body = {"prompt": "a fox", "n": 2, "response_format": "b64_json"}
        return await client.post(GENERATIONS, json=body, headers=bearer("alice"))

    async def load() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            before = await asyncio.gather(*(one(client) for _ in range(6)))
            # A request every 10 ms while Redis goes down for 0.3 s and comes back empty.
            restart = asyncio.ensure_future(asyncio.to_thread(own_redis.restart, 0.3))
            during = []
            while not restart.done():
                during.append(asyncio.ensure_future(one(client)))
                await asyncio.sleep(0.01)
            await restart
            during = await asyncio.gather(*during)
            after = [await one(client) for _ in range(6)]
            return [*before, *during, *after]

    answers = asyncio.run(load())
    assert all(_answer_is_acceptable(answer) for answer in answers), [
        (answer.status_code, answer.text[:200]) for answer in answers
    ]
    assert [answer.status_code for answer in answers[-6:]] == [200] * 6  # served again
    client = quota_client(app)
    assert [generate(client, "bob").status_code for _ in range(3)] == [200, 200, 429]


def test_a_redis_url_that_cannot_work_is_refused_by_name_at_start(
    args, generator, store, monkeypatch
):
    with pytest.raises(ValidationError, match=r"redis_url[\s\S]*must start with redis://"):
        quota_args(args, monkeypatch, "http://127.0.0.1:6379")
    with pytest.raises(ValidationError, match="port must be a number"):
        quota_args(args, monkeypatch, "redis://127.0.0.1:six/0")
    from_env = quota_args(args, monkeypatch, None, redis_url_env="IMAGE_SERVICE_TEST_REDIS")
    monkeypatch.delenv("IMAGE_SERVICE_TEST_REDIS", raising=False)
    with pytest.raises(ValueError, match=r"redis_url_env: \$IMAGE_SERVICE_TEST_REDIS is not set"):
        quota_app(from_env, generator, store)
    monkeypatch.setenv("IMAGE_SERVICE_TEST_REDIS", "localhost:6379")
    with pytest.raises(ValueError, match=r"IMAGE_SERVICE_TEST_REDIS: a Redis URL must start"):
        quota_app(from_env, generator, store)
    password = quota_args(
        args, monkeypatch, "redis://127.0.0.1:6379/0", redis_password_env="IMAGE_SERVICE_TEST_PW"
    )
    monkeypatch.delenv("IMAGE_SERVICE_TEST_PW", raising=False)
    with pytest.raises(ValueError, match=r"redis_password_env: \$IMAGE_SERVICE_TEST_PW is not"):
        quota_app(password, generator, store)


def test_quotas_need_api_keys_and_exactly_one_redis(args, monkeypatch):
    with pytest.raises(ValidationError, match=r"auth\.quotas needs API keys"):
        AppArgs.model_validate({"auth": {"quotas": {"redis_url": "redis://127.0.0.1:6379"}}})
    with pytest.raises(ValidationError, match="exactly one of redis_url and redis_url_env"):
        quota_args(args, monkeypatch, "redis://127.0.0.1:6379", redis_url_env="X")
    with pytest.raises(ValidationError, match="exactly one of redis_url and redis_url_env"):
        quota_args(args, monkeypatch, None)


def test_the_password_comes_from_its_environment_variable(
    args, generator, store, monkeypatch, tmp_path
):
    server = RedisServer(tmp_path, password="s3cret-redis")
    server.start()
    try:
        with_password = quota_args(
            args,
            monkeypatch,
            server.url,
            default={"requests": 5},
            redis_password_env="IMAGE_SERVICE_TEST_REDIS_PASSWORD",
        )
        monkeypatch.setenv("IMAGE_SERVICE_TEST_REDIS_PASSWORD", "s3cret-redis")
        assert generate(quota_client(quota_app(with_password, generator, store))).status_code == 200
        without = quota_args(args, monkeypatch, server.url, default={"requests": 5})
        refused = generate(quota_client(quota_app(without, generator, store)))
        assert assert_openai_error(refused, 503)["code"] == "quota_store_unavailable"
    finally:
        server.stop()


def test_a_slot_left_by_a_dead_ingress_expires_while_the_keys_others_live(
    generator, own_redis, quota_api
):
    app = quota_client(quota_api(default={"concurrent_requests": 2}))
    # An ingress that admitted requests and died before releasing their slots (2 s to live).
    dead = RedisQuotaStore(
        own_redis.url,
        None,
        timeout_s=1.0,
        prefix="image-service:quota:",
        window_s=60.0,
        slot_ttl_s=2.0,
    )
    key_id = sha256(KEYS["alice"])[:32]
    limits = KeyLimits(concurrent_requests=2)
    assert asyncio.run(dead.admit(key_id, limits, 3, "first-of-the-dead")).refused is None
    time.sleep(1.0)
    assert asyncio.run(dead.admit(key_id, limits, 3, "second-of-the-dead")).refused is None
    assert assert_openai_error(generate(app), 429)["code"] == "concurrency_limit_exceeded"
    time.sleep(1.1)  # the first slot's time is up; the second's is not
    assert generate(app).status_code == 200
