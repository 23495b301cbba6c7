"""The speed probe before each validation trace (`bench/capacity/probe.py`): open-loop
requests, each with an id of its own, their calls timed by the ingress's log. A real HTTP
server on 127.0.0.1 stands in for the service (this is about the probe's arithmetic and its
requests, `python -m bench.capacity validate` about the cluster); `logged` stands in for
the ingress's log, built from what that server saw."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import bench.capacity.probe as probe_module
from bench.capacity.probe import LoggedCall, probe
from bench.capacity.service import CallCost, ServiceModel
from bench.capacity.traces import RequestKind

KIND = RequestKind("small", 32, 32, 2)
SERVICE = ServiceModel(costs={("32x32", 1): CallCost(0.05, 0.01)}, source="test")
ANSWER_S = 0.12  # the server's answer: 0.02 s queued, a 0.08 s call, 0.02 s besides
QUEUE_S, CALL_S = 0.02, 0.08


@pytest.fixture
def service_url():
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            seen.append(self.headers["x-request-id"])
            time.sleep(ANSWER_S)
            body = json.dumps({"data": []}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1/images/generations", seen
    server.shutdown()
    thread.join()


def test_the_probe_times_calls_by_the_ingress_and_the_rest_is_overhead(service_url, monkeypatch):
    """The factor is the logged calls' seconds over the standalone ones (0.08 over 0.07),
    the overhead what the client waited beyond the logged queue and call (0.02 s and the
    HTTP round trip); the warm-up requests count for neither, and every request is asked
    of the log by the id it was sent with."""
    monkeypatch.setattr(probe_module, "PROBE_S", 3.0)
    url, seen = service_url
    asked: list[str] = []

    def logged(ids: list[str]) -> dict[str, LoggedCall]:
        asked.extend(ids)
        return {i: LoggedCall(KIND.size, KIND.steps, 1, QUEUE_S, CALL_S) for i in ids}

    result = probe(url, SERVICE, [KIND], logged)
    assert len(seen) == len(set(seen)) >= 6  # an id of its own for each request
    warm = {i for i in seen if int(i.rsplit("-", 1)[1]) < probe_module.PROBE_WARM_CALLS}
    assert len(warm) == probe_module.PROBE_WARM_CALLS and set(asked) == set(seen) - warm
    assert result["calls"] == len(seen) - probe_module.PROBE_WARM_CALLS
    assert result["factor"] == pytest.approx(CALL_S / 0.07, abs=0.001)
    assert 0.02 <= result["overhead_s"] < 0.15  # 0.02 s and the round trips
    assert result["rate"] == pytest.approx(probe_module.PROBE_BUSY / 0.07, abs=0.001)


def test_the_probe_s_rate_keeps_the_replica_equally_busy_at_any_speed():
    """A machine twice as slow gets half the requests: a fixed rate ran the replica half
    busy in a slow minute and Serve scaled it up before the trace (run 15)."""
    slow = ServiceModel(costs={("32x32", 1): CallCost(0.10, 0.02)}, source="test")
    fast_rate = probe_module.probe_rate(SERVICE, [KIND])
    assert probe_module.probe_rate(slow, [KIND]) == pytest.approx(fast_rate / 2)
    assert fast_rate * SERVICE.call_s(KIND.size, KIND.steps, 1) == pytest.approx(1 / 3)
    # A cluster whose lone call the calibration found twice the engine's seconds: the same.
    assert probe_module.probe_rate(SERVICE, [KIND], lone=2.0) == pytest.approx(fast_rate / 2)


def test_a_probe_the_log_does_not_know_fails_rather_than_guessing(service_url, monkeypatch):
    monkeypatch.setattr(probe_module, "PROBE_S", 1.0)
    with pytest.raises(RuntimeError, match="not in the ingress's log"):
        probe(service_url[0], SERVICE, [KIND], lambda ids: {})
