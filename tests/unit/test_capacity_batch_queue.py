"""The simulated replica's batch queue (`bench/capacity/batch_queue.py`) starts batches when
the service's batch queue (`deployments/generator/calls/batching.py`) would: a full batch first,
a lone job on an idle replica at once, and after a batch ends a `max_wait_s` window for as
many new jobs as it had."""

from __future__ import annotations

import pytest

from bench.capacity.batch_queue import SimulatedBatchQueue
from bench.capacity.traces import RequestKind

SMALL = RequestKind("small", 32, 32, 2)
LARGE = RequestKind("large", 256, 256, 16)
WAIT = 0.025


def queue() -> SimulatedBatchQueue[str]:
    return SimulatedBatchQueue(WAIT, lambda kind: 4 if kind is SMALL else 2)


def test_jobs_batch_by_kind_in_arrival_order_and_a_full_batch_goes_first():
    q = queue()
    q.add("large-1", LARGE, 0.0)
    for n in range(5):
        q.add(f"small-{n}", SMALL, 0.001 * n)
    first = q.take(0.01, running=0)
    assert first.jobs == ["small-0", "small-1", "small-2", "small-3"]  # full, not oldest
    assert q.take(0.01, running=0).jobs == ["large-1"]  # then the oldest
    assert q.take(0.01, running=0).jobs == ["small-4"]


def test_an_idle_replica_starts_a_lone_job_at_once_a_busy_one_after_the_wait():
    q = queue()
    q.add("a", SMALL, 1.0)
    assert q.ready_at(1.0, running=0) == 1.0
    assert q.take(1.0, running=1) is None  # a second worker, a call running
    assert q.ready_at(1.0, running=1) == pytest.approx(1.0 + WAIT)
    assert q.take(1.0 + WAIT, running=1).jobs == ["a"]


def test_after_a_batch_ends_a_partial_batch_waits_for_its_callers_or_the_window():
    q = queue()
    q.finished(2, now=5.0)  # a batch of two jobs ended
    q.add("a", SMALL, 5.001)  # one of its callers asks again
    assert q.take(5.002, running=0) is None  # waits for the other
    assert q.ready_at(5.002, running=0) == pytest.approx(5.0 + WAIT)
    assert q.take(5.0 + WAIT, running=0).jobs == ["a"]  # the window ran out

    q.finished(2, now=6.0)
    q.add("b", SMALL, 6.001)
    q.add("c", SMALL, 6.002)  # both came: the window closes early
    assert q.take(6.002, running=0).jobs == ["b", "c"]


def test_a_full_batch_starts_inside_the_window():
    q = queue()
    q.finished(4, now=0.0)
    q.add("l1", LARGE, 0.001)
    q.add("l2", LARGE, 0.002)  # full at 2
    assert q.take(0.003, running=0).jobs == ["l1", "l2"]
