"""Where each request's time went (`bench/capacity/breakdown.py`): a real request's parts
come from its own ingress log line, found by the id it was sent with; a simulated one's
parts add up to its latency."""

from __future__ import annotations

import pytest

from bench.capacity.breakdown import overlap_effect, real_parts, sim_parts, trace_request_id
from bench.capacity.contention import NONE
from bench.capacity.service import CallCost, ServiceModel
from bench.capacity.simulation import ReplicaSettings, simulate
from bench.capacity.traces import RequestKind, steady
from tests.unit.test_capacity_validation import SETTINGS

KIND = RequestKind("small", 32, 32, 2)


def test_a_real_request_s_parts_come_from_its_own_log_line():
    # Two requests; the log has them in the other order, and a probe's line before 0.
    requests = [(0.0, "ok", 1.0, 1.0), (0.5, "ok", 2.5, 2.0)]
    server = [
        [-3.0, "32x32", 2, 1, 0.0, 0.1, "probe-x-1", 0.2],
        [0.9, "32x32", 2, 1, 0.1, 0.3, trace_request_id(1), 1.8],
        [1.0, "32x32", 2, 1, 0.2, 0.5, trace_request_id(0), 0.9],
    ]
    parts = real_parts(requests, server)
    assert parts is not None
    # Request 0: outside 1.0 - 0.9, ingress 0.9 - 0.2 - 0.5; request 1: 0.2 and 1.4.
    assert parts["call"]["p50_s"] in (0.3, 0.5) and parts["call"]["p95_s"] == 0.5
    assert parts["outside"]["p95_s"] == 0.2
    assert parts["ingress"]["p95_s"] == 1.4
    assert real_parts(requests, [row[:6] for row in server]) is None  # lines without ids


def test_a_simulated_request_s_parts_add_up_to_its_latency():
    service = ServiceModel({("32x32", 1): CallCost(0.05, 0.01)}, "test", request_overhead_s=0.03)
    trace = steady(30.0, 10.0, [(KIND, 1.0)], seed=1)  # more than a replica serves: waits
    replica = ReplicaSettings(max_ongoing_requests=2, max_queued_requests=1000, start_s=5)
    sim = simulate(trace, service, SETTINGS, replica, 0, NONE)
    answered = [r for r in sim.requests if r.status == "ok"]
    for record in answered:
        assert record.routed is not None and record.call_began is not None
        parts = (
            0.03,
            record.routed - record.arrival.t,
            record.call_began - record.routed,
            record.done - 0.03 - record.call_began,
        )
        assert abs(sum(parts) - record.latency_s) < 1e-9 and min(parts) >= 0
    parts = sim_parts(sim)
    assert parts["ingress"]["p95_s"] > 0  # the backlog waited at the handle
    assert parts["outside"]["p50_s"] == 0.03


def test_calls_beside_another_are_told_from_calls_alone_by_their_logged_times():
    """Six calls alone at 1.0 of their standalone seconds, then six pairs at once at 1.5:
    beside another they ran x1.5 the lone ones. A batch's jobs share one line time and
    count once."""
    service = ServiceModel({("32x32", 1): CallCost(0.05, 0.025)}, "test")  # 0.1 s a call
    server = [[t + 0.1, "32x32", 2, 1, 0.0, 0.1, f"a{t}", 0.1] for t in range(6)]
    for t in range(10, 16):
        server.append([t + 0.15, "32x32", 2, 1, 0.0, 0.15, f"b{t}", 0.15])
        server.append([t + 0.16, "32x32", 2, 1, 0.0, 0.15001, f"c{t}", 0.15])
        server.append([t + 0.17, "32x32", 2, 1, 0.0, 0.15001, f"d{t}", 0.15])  # c's batch
    effect = overlap_effect(server, service)
    assert effect is not None and effect["calls"] == [6, 12]
    assert effect["alone"] == 1.0 and effect["beside"] == effect["ratio"] == pytest.approx(1.5)
    assert overlap_effect(server[:6], service) is None  # none beside another: no figure
