"""In-process apps with API keys and per-key quotas over a real Redis, for the quota tests."""

from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api
from deployments.storage import ImageStore

from .fakes import FakeGenerator

KEYS_ENV = "IMAGE_SERVICE_QUOTA_TEST_KEYS"
KEYS = {"alice": "sk-alice-7f3a9c", "bob": "sk-bob-11d04e", "carol": "sk-carol-5be2a7"}
GENERATIONS = "/v1/images/generations"


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"}


class QuotaCounts:
    """Stands in for `IngressMetrics`: what the quotas record."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.image_steps: dict[str, int] = {}
        self.store_errors: dict[str, int] = {}

    def key_request(self, key: str, outcome: str, image_steps: int) -> None:
        self.requests[(key, outcome)] = self.requests.get((key, outcome), 0) + 1
        self.image_steps[key] = self.image_steps.get(key, 0) + image_steps

    def quota_store_error(self, operation: str) -> None:
        self.store_errors[operation] = self.store_errors.get(operation, 0) + 1

    def error(self, error_type: str, code: str | None) -> None:
        pass

    def moderation_blocked(self, model: str, key: str, what: str) -> None:
        pass

    def request_finished(self, fields) -> None:
        pass


def quota_args(args: AppArgs, monkeypatch, redis_url: str | None, **quotas) -> AppArgs:
    """`args` with the three keys on, alice named, and `quotas` over Redis at `redis_url`."""
    monkeypatch.setenv(KEYS_ENV, " ".join(KEYS.values()))
    named = quotas.pop("keys", [{"name": "alice"}])
    keys = [{"key_sha256": sha256(KEYS[key["name"]]), **key} for key in named]
    config = {"redis_url": redis_url, "keys": keys, **quotas}
    if config["redis_url"] is None:
        del config["redis_url"]
    auth = {"api_keys_env": KEYS_ENV, "quotas": config}
    return AppArgs.model_validate({**args.model_dump(), "auth": auth})


def quota_app(
    args: AppArgs, generator: FakeGenerator, store: ImageStore, metrics: QuotaCounts | None = None
) -> FastAPI:
    return create_api(args, {"tiny-sd3": generator}, store, quota_metrics=metrics)


def quota_app_builder(
    args: AppArgs, generator: FakeGenerator, store: ImageStore, monkeypatch, redis_url: str
):
    """What a test's `quota_api` fixture gives: `build(metrics, **quotas)`, an app with those
    quotas over the Redis at `redis_url`."""

    def build(metrics: QuotaCounts | None = None, **quotas) -> FastAPI:
        return quota_app(
            quota_args(args, monkeypatch, redis_url, **quotas), generator, store, metrics
        )

    return build


def quota_client(app: FastAPI) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


def generate(client: TestClient, key: str = "alice", **body) -> httpx.Response:
    return client.post(GENERATIONS, json={"prompt": "a fox", **body}, headers=bearer(key))


async def call_asgi(app: FastAPI, key: str, body: dict, *, leave_once_started: bool = False):
    """POST a generation straight to the ASGI app, as a server would: (status, headers, body
    chunks). With `leave_once_started`, the client leaves (`http.disconnect`) as soon as the
    response has started."""
    payload = json.dumps({"prompt": "a fox", **body}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": GENERATIONS,
        "raw_path": GENERATIONS.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"authorization", bearer(key)["authorization"].encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    sent_body = False
    left = asyncio.Event()

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    started: dict = {}
    chunks: list[bytes] = []

    async def send(message):
        if message["type"] == "http.response.start":
            started.update(message)
            if leave_once_started:
                left.set()
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in started.get("headers", [])}
    return started.get("status"), headers, chunks
