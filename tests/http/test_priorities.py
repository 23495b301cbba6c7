"""A request's class and deadline at the ingress: what its job carries to the replica, the
headers that change them, and the per-class account of how it ended."""

from __future__ import annotations

import hashlib
import time

from fastapi.testclient import TestClient

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api

from .test_observability import ErrorCounts

KEYS_ENV = "PRIORITY_TEST_KEYS"
KEYS = {"gold": "sk-gold-7f1c", "bulk": "sk-bulk-22ab"}


class ClassCounts(ErrorCounts):
    """Stands in for `IngressMetrics`: keeps each finished request's fields."""

    def __init__(self) -> None:
        super().__init__()
        self.finished: list[dict] = []

    def request_finished(self, fields) -> None:
        self.finished.append(dict(fields))


def client_of(args, generator, store, monkeypatch, metrics=None) -> TestClient:
    monkeypatch.setenv(KEYS_ENV, ",".join(KEYS.values()))
    sha = {name: hashlib.sha256(key.encode()).hexdigest() for name, key in KEYS.items()}
    args = AppArgs.model_validate(
        {
            **args.model_dump(),
            "auth": {"api_keys_env": KEYS_ENV},
            "request_timeout_s": 30,
            "scheduling": {
                "header_classes": ["low"],
                "keys": [
                    {"key_sha256": sha["gold"], "priority": "high"},
                    {"key_sha256": sha["bulk"], "priority": "low"},
                ],
                "aging_s": 5,
            },
        }
    )
    app = create_api(args, {"tiny-sd3": generator}, store, metrics=metrics)
    return TestClient(app, raise_server_exceptions=False)


def post(client: TestClient, key: str, **headers: str):
    headers = {"authorization": f"Bearer {KEYS[key]}", **headers}
    return client.post("/v1/images/generations", json={"prompt": "a fox"}, headers=headers)


def test_each_job_carries_its_keys_class_and_its_deadline(args, generator, store, monkeypatch):
    client = client_of(args, generator, store, monkeypatch)
    before = time.time()
    assert post(client, "gold").status_code == 200
    assert post(client, "bulk").status_code == 200
    assert (
        post(client, "gold", **{"x-priority": "low", "x-request-timeout": "7"}).status_code == 200
    )
    gold, bulk, stepped_back = (job.schedule for job in generator.jobs)
    assert (gold.priority_class, gold.rank, bulk.priority_class, bulk.rank) == ("high", 0, "low", 2)
    assert before <= gold.arrived <= time.time()
    assert gold.deadline - gold.arrived == 30
    assert (stepped_back.priority_class, stepped_back.deadline - stepped_back.arrived) == ("low", 7)
    assert gold.aging_s == 5 and gold.refuse_late


def test_a_class_the_key_may_not_ask_for_is_refused_before_the_replica(
    args, generator, store, monkeypatch
):
    client = client_of(args, generator, store, monkeypatch)
    for headers, code in [
        ({"x-priority": "high"}, "priority_not_allowed"),
        ({"x-priority": "vip"}, "invalid_priority"),
    ]:
        response = post(client, "bulk", **headers)
        assert response.status_code == 400
        assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (
            "x-priority",
            code,
        )
    response = post(client, "bulk", **{"x-request-timeout": "soon"})
    assert (response.status_code, response.json()["error"]["param"]) == (400, "x-request-timeout")
    assert generator.jobs == []


def test_the_clients_shorter_timeout_ends_the_wait_and_the_generation(
    args, generator, store, monkeypatch
):
    client = client_of(args, generator, store, monkeypatch)
    generator.delay_s = 3.0
    started = time.monotonic()
    response = post(client, "gold", **{"x-request-timeout": "0.3"})
    assert response.status_code == 504
    assert time.monotonic() - started < 2.0
    assert generator.cancelled == generator.jobs


def test_each_request_is_counted_by_model_class_and_outcome(args, generator, store, monkeypatch):
    counts = ClassCounts()
    client = client_of(args, generator, store, monkeypatch, metrics=counts)
    post(client, "gold")
    post(client, "bulk")
    post(client, "bulk", **{"x-priority": "high"})
    generator.delay_s = 2.0
    post(client, "gold", **{"x-request-timeout": "0.2"})
    ended = [
        (f.get("model"), f.get("priority"), f["status"], f.get("queue_s")) for f in counts.finished
    ]
    # A class it may not ask for is refused before the request has a class or a model.
    assert ended == [
        ("tiny-sd3", "high", 200, 0.25),
        ("tiny-sd3", "low", 200, 0.25),
        (None, None, 400, None),
        ("tiny-sd3", "high", 504, None),
    ]
