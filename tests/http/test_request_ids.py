"""A client's `x-request-id` is bounded: an id of at most 128 id characters is the request's
id in its job and every log line; anything else is a 400 naming the header, logged under a
fresh id, so a client cannot write 64 KB into every log line of its request."""

from __future__ import annotations

import logging

import pytest

from .checks import assert_openai_error

GENERATIONS = "/v1/images/generations"
BODY = {"prompt": "a fox", "size": "32x32"}


@pytest.fixture(autouse=True)
def capture_info(caplog):
    caplog.set_level(logging.INFO, logger="ray.serve")


def logged_ids(caplog) -> list[str]:
    return [r.image_request["request_id"] for r in caplog.records if hasattr(r, "image_request")]


@pytest.mark.parametrize(
    "request_id",
    ["req-1", "6f1c2a7e-4b1d-4c59-9a51-0d3c1f2b9e77", "01HZX3J9Q8", "trace.span:1_2", "a" * 128],
)
def test_a_well_formed_id_is_the_requests_id(client, generator, caplog, request_id):
    response = client.post(GENERATIONS, json=BODY, headers={"x-request-id": request_id})
    assert response.status_code == 200
    assert generator.jobs[-1].request_id == request_id
    assert logged_ids(caplog) == [request_id]


@pytest.mark.parametrize(
    "request_id",
    ["x" * 65536, "a" * 129, "has space", "new\u2028line", 'quote"d', "semi;colon", "é"],
    ids=["64KB", "129", "space", "separator", "quote", "semicolon", "non-ascii"],
)
@pytest.mark.parametrize("route", ["generations", "edits"])
def test_any_other_id_is_a_400_naming_the_header_and_never_logged(
    client, generator, caplog, request_id, route
):
    headers = {"x-request-id": request_id.encode("utf-8")}
    as_received = request_id.encode("utf-8").decode("latin-1")  # how HTTP carries the bytes
    if route == "generations":
        response = client.post(GENERATIONS, json=BODY, headers=headers)
    else:
        files = {"image": ("in.png", b"not read", "image/png")}
        response = client.post("/v1/images/edits", data=BODY, files=files, headers=headers)
    error = assert_openai_error(response, 400, param="x-request-id")
    assert error["type"] == "invalid_request_error"
    assert generator.jobs == []
    (logged,) = logged_ids(caplog)
    assert logged != request_id and len(logged) == 32  # a fresh id stands in
    assert not any(as_received in record.getMessage() for record in caplog.records)
