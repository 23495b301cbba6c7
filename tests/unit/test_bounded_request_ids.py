"""A malformed `x-request-id` never reaches Serve's log lines: Ray's proxy copies the header
into Serve's request context, whose id Serve's formatter writes into every log line of the
request (and of its generator calls); the ingress's middleware puts a fresh id there, the
same one the app logs its 400 under."""

from __future__ import annotations

import asyncio

import pytest
from ray.serve import context as serve_context

from deployments.ingress.deployment import BoundedRequestIds


def seen_by_the_app(header: bytes) -> tuple[str, str | None]:
    """(Serve's request id, the app's `request.state` id) inside the app, for a request
    whose proxy set the context from `header`."""
    seen = {}

    async def app(scope, receive, send):
        seen["context"] = serve_context._serve_request_context.get().request_id
        seen["state"] = scope.get("state", {}).get("request_id")

    async def request():
        proxy_set = header.decode("latin-1")
        serve_context._serve_request_context.set(
            serve_context._RequestContext(request_id=proxy_set)
        )
        scope = {"type": "http", "headers": [(b"x-request-id", header)]}
        await BoundedRequestIds(app)(scope, None, None)

    asyncio.run(request())
    return seen["context"], seen["state"]


@pytest.mark.parametrize("header", [b"x" * 65536, b"a b", "é".encode(), b"a" * 129])
def test_a_malformed_id_is_replaced_in_serves_context_by_the_apps_fresh_one(header):
    context_id, state_id = seen_by_the_app(header)
    assert context_id != header.decode("latin-1")
    assert len(context_id) == 32 and context_id == state_id


@pytest.mark.parametrize("header", [b"req-1", b"6f1c2a7e-4b1d-4c59-9a51-0d3c1f2b9e77"])
def test_a_well_formed_id_is_left_as_the_proxy_set_it(header):
    assert seen_by_the_app(header) == (header.decode(), None)
