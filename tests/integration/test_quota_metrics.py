"""Per-key quotas in a real Serve application: the ingress replica counts in a real Redis,
and each key's usage reaches Ray's metrics endpoint under its name, never its secret."""

from __future__ import annotations

import hashlib

import httpx
import pytest
from ray import serve

from serve_app import build_app
from tests.redis_server import RedisServer

from .test_metrics import scrape_until, total

pytestmark = pytest.mark.integration

MODEL_ID = "quota-sd3"  # its own id: other modules' replicas report under theirs
KEYS = {"int-alice": "sk-int-alice-93be", "bob": "sk-int-bob-0c41"}


def test_per_key_requests_and_image_steps_reach_the_metrics(serve_url, tmp_path):
    redis = RedisServer(tmp_path)
    redis.start()
    keys_file = tmp_path / "keys"
    keys_file.write_text("\n".join(KEYS.values()) + "\n")
    alice_sha = hashlib.sha256(KEYS["int-alice"].encode()).hexdigest()
    args = {
        "models": [{"id": MODEL_ID, "device": "cpu", "default_size": "32x32", "default_steps": 2}],
        "auth": {
            "api_keys_file": str(keys_file),
            "quotas": {
                "redis_url": redis.url,
                "default": {"requests": 2},
                "keys": [{"name": "int-alice", "key_sha256": alice_sha}],
            },
        },
    }
    serve.run(build_app(args), name="quotas", route_prefix="/quota-test")
    try:
        url = f"{serve_url}/quota-test/v1/images/generations"

        def post(name: str) -> httpx.Response:
            headers = {"authorization": f"Bearer {KEYS[name]}"}
            return httpx.post(url, json={"prompt": "x"}, headers=headers, timeout=60)

        alice = [post("int-alice") for _ in range(3)]
        assert [response.status_code for response in alice] == [200, 200, 429]
        assert alice[1].headers["x-ratelimit-remaining-requests"] == "0"
        assert post("bob").status_code == 200
        requests = "ray_image_generation_key_requests_total"
        samples = scrape_until(
            lambda s: (
                total(s, requests, key="int-alice", outcome="requests") >= 1
                and total(s, requests, outcome="admitted") >= 3
            )
        )
        assert total(samples, requests, key="int-alice", outcome="admitted") == 2
        assert total(samples, requests, key="int-alice", outcome="requests") == 1
        assert total(samples, "ray_image_generation_key_image_steps_total", key="int-alice") == 4
        labels = {labels.get("key", "") for name, labels, _ in samples if name == requests}
        assert any(label.startswith("key-") for label in labels)  # bob: unnamed, a short hash
        assert not any("sk-" in label for label in labels)
    finally:
        serve.delete("quotas")
        redis.stop()
