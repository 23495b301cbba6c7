"""One structured log line per request, and errors counted for the metrics."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api

from .fakes import REPLICA_TIMINGS


class ErrorCounts:
    """Stands in for `IngressMetrics`: counts errors by (type, code)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str | None], int] = {}

    def error(self, error_type: str, code: str | None) -> None:
        self.counts[(error_type, code)] = self.counts.get((error_type, code), 0) + 1

    def moderation_blocked(self, model: str, key: str, what: str) -> None:
        self.counts[("blocked", f"{model}/{key}/{what}")] = 1

    def request_finished(self, fields) -> None:
        pass


def request_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if hasattr(r, "image_request")]


@pytest.fixture(autouse=True)
def capture_info(caplog):
    caplog.set_level(logging.INFO, logger="ray.serve")


def test_a_request_gets_one_line_with_parameters_timings_and_outcome(client, caplog):
    response = client.post(
        "/v1/images/generations",
        json={"prompt": "a secret fox", "n": 2, "size": "32x32", "seed": 9},
        headers={"x-request-id": "req-1"},
    )
    assert response.status_code == 200
    (record,) = request_lines(caplog)
    fields = record.image_request
    assert fields["request_id"] == "req-1"
    assert (fields["status"], fields["outcome"]) == (200, "ok")
    assert (fields["n"], fields["size"], fields["steps"], fields["seed"]) == (2, "32x32", 3, 9)
    # The replica's account of the job, as it sent it; the ingress's own encoding time.
    assert {name: fields[name] for name in REPLICA_TIMINGS} == REPLICA_TIMINGS
    assert 0 < fields["encode_s"] <= fields["total_s"]
    assert fields["prompt_chars"] == len("a secret fox")
    assert "prompt" not in fields
    message = record.getMessage()
    assert message.startswith("image_request request_id=req-1 ")
    assert "secret" not in message
    assert "\n" not in message


def test_prompts_are_logged_only_when_configured(args, generator, store, caplog):
    args = AppArgs.model_validate({**args.model_dump(), "request_logs": {"include_prompts": True}})
    client = TestClient(create_api(args, {"tiny-sd3": generator}, store))
    client.post("/v1/images/generations", json={"prompt": 'a "quoted"\nfox'})
    (record,) = request_lines(caplog)
    assert record.image_request["prompt"] == 'a "quoted"\nfox'
    assert 'prompt="a \\"quoted\\"\\nfox"' in record.getMessage()


def test_rejected_and_streamed_requests_get_their_line_too(client, caplog):
    client.post("/v1/images/generations", json={"prompt": "a fox", "size": "33x33"})
    client.post("/v1/images/generations", json={"prompt": "a fox", "stream": True})
    rejected, streamed = (record.image_request for record in request_lines(caplog))
    assert (rejected["status"], rejected["outcome"], rejected["error_code"]) == (
        400,
        "client_error",
        "invalid_value",
    )
    assert (streamed["status"], streamed["stream"]) == (200, True)
    assert 0 < streamed["encode_s"] <= streamed["total_s"]


def test_errors_are_counted_by_type_and_code(args, generator, store):
    counts = ErrorCounts()
    client = TestClient(create_api(args, {"tiny-sd3": generator}, store, metrics=counts))
    client.post("/v1/images/generations", json={"prompt": "a fox", "size": "33x33"})
    client.post("/v1/images/generations", json={"prompt": "a fox", "size": "33x33"})
    client.post("/v1/images/generations", json={"prompt": "a fox", "model": "nope"})
    client.get("/no/such/route")
    client.post("/v1/images/generations", json={"prompt": "a fox"})
    assert counts.counts == {
        ("invalid_request_error", "invalid_value"): 2,
        ("invalid_request_error", "model_not_found"): 1,
        ("not_found", None): 1,
    }
