"""How the continuous loop's lanes share a replica's adapter slots (`loop_adapters.py`): a job
joins only if its adapters fit beside every lane's in flight, and the first job refused a
slot claims it, so that the other lanes stop taking new adapters until it has one."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from deployments.generator.loop.loop_adapters import LoopAdapters


def slots(count: int) -> LoopAdapters:
    store = SimpleNamespace(max_loaded=count, after_load=[])
    return LoopAdapters(store, torch.nn.Linear(2, 2), torch.device("cpu"))


def test_a_job_joins_only_beside_what_fits_and_its_claim_drains_the_other_lane():
    adapters = slots(2)
    a_lane, b_lane = object(), object()
    adapters.publish(b_lane, {"ink", "paper"})
    assert not adapters.reserve(a_lane, set(), {"chalk"})  # both slots in use elsewhere
    # The claim counts as taken: the other lane takes no more of its own adapters' jobs.
    assert not adapters.reserve(b_lane, {"ink", "paper"}, {"ink"})
    adapters.publish(b_lane, {"paper"})  # its ink images finished
    adapters.unclaim(a_lane)  # the waiting lane's next admission
    assert adapters.reserve(a_lane, set(), {"chalk"})
    # Reserved at once: the other lane cannot take the last slot meanwhile.
    assert not adapters.reserve(b_lane, {"paper"}, {"ink"})


def test_a_lane_alone_may_run_what_it_has_and_a_job_joining_an_idle_loop_always_may():
    adapters = slots(1)
    a_lane, b_lane = object(), object()
    assert adapters.reserve(a_lane, set(), {"ink", "paper"})  # nothing else in flight
    adapters.publish(a_lane, set())
    adapters.publish(b_lane, set())
    assert adapters.reserve(b_lane, set(), {"chalk"})
