"""The capacity simulation (`bench/capacity/`): on a tiny seeded trace it scales out under a
burst and back after it, no sooner than Serve's delays allow; and its model of Serve's
autoscaler agrees with Ray's own code, decision for decision and average for average."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import ray.serve.autoscaling_policy as ray_policy
from ray.serve._private.autoscaling_metrics_merge import merge_and_aggregate_arrays
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from bench.capacity.autoscaler import (
    AutoscalingSettings,
    DelayState,
    HandleReport,
    PushedSeries,
    decide,
    default_policy_wish,
    series_mean,
)
from bench.capacity.contention import Contention
from bench.capacity.service import CallCost, ServiceModel
from bench.capacity.simulation import ReplicaSettings, Simulation, simulate
from bench.capacity.traces import Arrival, RequestKind, Trace, burst

SMALL = RequestKind("small", 32, 32, 2)
LARGE = RequestKind("large", 256, 256, 16)
# Seconds per call: 0.05 + 0.01 a step for small images, 0.1 + 0.02 a step for large ones.
SERVICE = ServiceModel(
    costs={
        ("32x32", 1): CallCost(0.05, 0.01),
        ("32x32", 4): CallCost(0.08, 0.02),
        ("256x256", 1): CallCost(0.1, 0.02),
        ("256x256", 4): CallCost(0.3, 0.08),
    },
    source="test",
)
FAST = AutoscalingSettings(
    min_replicas=1,
    max_replicas=3,
    target_ongoing_requests=2,
    upscale_delay_s=3,
    downscale_delay_s=8,
    look_back_period_s=2,
    metrics_interval_s=0.5,
)
REPLICA = ReplicaSettings(max_ongoing_requests=4, max_queued_requests=200, start_s=5)
BURST_AT, BURST_S = 10.0, 10.0


def large_burst(seed: int = 3):
    # One small request a second, then 5 large ones a second for 10 s: two replicas' worth
    # (each runs one 0.42 s call at a time), and a backlog.
    return burst(1, 5, BURST_AT, BURST_S, 60, [(SMALL, 1)], [(LARGE, 1)], seed=seed)


def test_a_burst_scales_out_no_sooner_than_the_delays_allow_and_back_after():
    result = simulate(large_burst(), SERVICE, FAST, REPLICA, seed=1)
    ups = [(t, old, new) for t, old, new in result.decisions if new > old]
    downs = [(t, old, new) for t, old, new in result.decisions if new < old]
    assert ups and downs
    first_up = ups[0][0]
    # The burst must first show in the handle's averages, then last upscale_delay_s.
    assert first_up >= BURST_AT + FAST.upscale_delay_s
    assert max(new for _, _, new in ups) == FAST.max_replicas
    # A new replica serves start_s after the decision, not before.
    grown = next(t for t, running, _, _ in result.timeline if running > 1)
    assert grown >= first_up + REPLICA.start_s
    # The way down waits downscale_delay_s past the end of the burst's backlog at least.
    assert downs[0][0] >= BURST_AT + BURST_S + FAST.downscale_delay_s
    assert result.timeline[-1][1] == FAST.min_replicas
    summary = result.summary()
    assert summary["ok"] == summary["requests"]


def test_the_same_seed_gives_the_same_run():
    one = simulate(large_burst(), SERVICE, FAST, REPLICA, seed=1).summary()
    two = simulate(large_burst(), SERVICE, FAST, REPLICA, seed=1).summary()
    assert one == two


def test_longer_delays_scale_later():
    patient = AutoscalingSettings(**{**FAST.__dict__, "upscale_delay_s": 6})
    quick = simulate(large_burst(), SERVICE, FAST, REPLICA, seed=1).decisions[0][0]
    slow = simulate(large_burst(), SERVICE, patient, REPLICA, seed=1).decisions[0][0]
    assert slow >= quick + 3 - 0.5  # the 3 s more, less a record interval's jitter


def test_the_cost_aware_policy_scales_for_large_requests_only():
    cost_aware = AutoscalingSettings(
        **{**FAST.__dict__, "cost_target_step_pixels": 2 * LARGE.work, "target_ongoing_requests": 1}
    )
    large = simulate(large_burst(), SERVICE, cost_aware, REPLICA, seed=1)
    # As many small requests a second as keep one replica busy most of the time.
    small_trace = burst(1, 12, BURST_AT, BURST_S, 60, [(SMALL, 1)], [(SMALL, 1)], seed=3)
    small = simulate(small_trace, SERVICE, cost_aware, REPLICA, seed=1)
    assert large.summary()["max_replicas"] > 1
    assert small.summary()["max_replicas"] == 1
    # Serve's default policy, at the same target_ongoing_requests, scales for them too.
    default = AutoscalingSettings(**{**cost_aware.__dict__, "cost_target_step_pixels": None})
    assert simulate(small_trace, SERVICE, default, REPLICA, seed=1).summary()["max_replicas"] > 1


# One call of 1 s standalone (no overhead), on two replicas that never scale.
ONE_SECOND = ServiceModel(costs={("32x32", 1): CallCost(1.0, 0.0)}, source="test")
TWO = AutoscalingSettings(**{**FAST.__dict__, "min_replicas": 2, "max_replicas": 2})


def latencies(arrivals: list[float], contention: Contention) -> list[float]:
    trace = Trace("t", 5.0, tuple(Arrival(t, SMALL, i) for i, t in enumerate(arrivals)), "t")
    result = simulate(trace, ONE_SECOND, TWO, REPLICA, seed=1, contention=contention)
    return [round(r.latency_s, 6) for r in result.requests]


def test_calls_sharing_the_cores_slow_each_other_down_while_they_overlap():
    """Two 1 s calls on two replicas, the second from 0.5 s, twice as slow together: the
    first runs 0.5 s alone, its other half in 1 s beside the second, which then ends its
    last half alone: both answer 1.5 s after they came. With no contention, 1 s each."""
    shared = Contention({(1, 0): 1.0, (2, 0): 2.0})
    assert latencies([0.0, 0.5], shared) == [1.5, 1.5]
    assert latencies([0.0, 0.5], Contention()) == [1.0, 1.0]
    assert latencies([0.0, 2.0], shared) == [1.0, 1.0]  # never at once


def test_a_starting_replica_slows_the_serving_ones_until_it_runs():
    """The burst's scale-up with a replica start that halves the serving replica's speed
    answers later than the same run with calls that do not feel it."""
    starting = Contention({(1, 0): 1.0, (2, 0): 1.0, (1, 1): 2.0})
    slowed = simulate(large_burst(), SERVICE, FAST, REPLICA, seed=1, contention=starting)
    plain = simulate(large_burst(), SERVICE, FAST, REPLICA, seed=1)
    assert slowed.decisions and plain.decisions
    assert slowed.summary()["p95_s"] > plain.summary()["p95_s"] * 1.2


def test_unmeasured_states_combine_the_nearest_measured_effects():
    contention = Contention({(1, 0): 1.1, (2, 0): 1.5, (1, 1): 2.2})
    assert contention.factor(0, 0) == 1.1  # a call is always at least one
    assert contention.factor(3, 0) == 1.5
    assert contention.factor(2, 1) == pytest.approx(1.5 * 2.2 / 1.1)
    assert Contention().factor(2, 1) == 1.0
    backlog = Contention({(1, 0): 1.0}, backlog=((8, 1.2),))
    assert backlog.factor(1, 0, 4) == pytest.approx(1.1)
    assert backlog.factor(1, 0, 20) == pytest.approx(1.2)  # no further than measured
    assert Contention.from_json(backlog.to_json()) == backlog
    old_file = {**backlog.to_json(), "backlog": [8, 1.2]}  # one point, before 2026-12-08
    assert Contention.from_json(old_file) == backlog


def test_the_backlog_s_effect_follows_each_measured_backlog_and_stops_at_the_last():
    """Measured at 8 and 24 waiting: between them it follows both, not the first alone
    (which would stay at its own factor from 8 on), and beyond 24 it goes no further."""
    two = Contention({(1, 0): 1.5}, backlog=((8, 1.2), (24, 1.6)))
    assert two.factor(1, 0, 8) == pytest.approx(1.5 * 1.2)
    assert two.factor(1, 0, 16) == pytest.approx(1.5 * 1.4)
    assert two.factor(1, 0, 40) == pytest.approx(1.5 * 1.6)
    assert Contention.from_json(two.to_json()) == two


def test_requests_waiting_at_the_handle_slow_the_calls_and_wait_for_the_router():
    """Six 1 s calls at once on one replica of room for one: the five that wait at the
    handle slow the running call by their share of the measured backlog's effect, and a
    freed slot waits for a routing task's next retry (Ray's backoff: 25 ms doubling to
    0.5 s, two tasks for one replica)."""
    one = AutoscalingSettings(**{**FAST.__dict__, "min_replicas": 1, "max_replicas": 1})
    room = ReplicaSettings(max_ongoing_requests=1, max_queued_requests=10, start_s=5)
    trace = Trace("t", 5.0, tuple(Arrival(0.0, SMALL, i) for i in range(6)), "t")
    slowed = Contention({(1, 0): 1.0}, backlog=((5, 2.0),))
    result = simulate(trace, ONE_SECOND, one, room, seed=1, contention=slowed)
    latencies = sorted(r.latency_s for r in result.requests)
    # 5 waiting: 2 s; then 4 (1.8 s), 3, 2, 1, none (1 s), each call from the first retry
    # after the last ended: both tasks in backoff since 0 retry at 0.025 x (1 + 2 + ... + 16)
    # + 0.5 x k (2.275 s, then every 0.5 s), the one that routed restarts at 25 ms.
    assert latencies[0] == pytest.approx(2.0)
    assert latencies[1] == pytest.approx(2.275 + 1.8)
    assert latencies[2] == pytest.approx(4.275 + 1.6)
    assert latencies[-1] > 2.0 + 1.8 + 1.6 + 1.4 + 1.2 + 1.0  # the calls alone: 9 s


def test_a_freed_slot_goes_to_the_routing_task_that_retries_first_with_its_own_request():
    """Ray's routing tasks each route their own request: one that has waited long, its task
    backed off to 0.5 s, is passed by a later one whose fresh task retries sooner (a FIFO
    handle would send the older one first)."""
    one = AutoscalingSettings(**{**FAST.__dict__, "min_replicas": 1, "max_replicas": 1})
    room = ReplicaSettings(max_ongoing_requests=1, max_queued_requests=10, start_s=5)
    arrivals = (Arrival(0.0, SMALL, 0), Arrival(0.0, SMALL, 1), Arrival(0.9, SMALL, 2))
    result = simulate(Trace("t", 2.0, arrivals, "t"), ONE_SECOND, one, room, seed=1)
    latency = {r.arrival.seed: r.latency_s for r in result.requests}
    # The slot frees at 1 s. The second request's task retries at 0.775 and 1.275 s; the
    # third's, from 0.9 s, at 0.925, 0.975 and 1.075 s: it runs from 1.075 s, and the
    # second from its task's first retry after that call, 2.275 s.
    assert latency[0] == pytest.approx(1.0)
    assert latency[2] == pytest.approx(2.075 - 0.9)
    assert latency[1] == pytest.approx(3.275)


DEPLOYMENT = DeploymentID(name="d", app_name="a")


def ray_context(total: float, current: int, target: int, config, state) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name="d",
        app_name="a",
        current_num_replicas=current,
        target_num_replicas=target,
        running_replicas=[],
        total_num_requests=total,
        total_queued_requests=0.0,
        aggregated_metrics={},
        raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state,
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"upscaling_factor": 0.5, "downscaling_factor": 0.3},
        {"min_replicas": 0, "downscale_to_zero_delay_s": 0.5},
    ],
    ids=["plain", "factors", "to-zero"],
)
def test_the_model_of_serve_decides_as_ray_does(monkeypatch, fields):
    """Ray's default policy wrapped as Ray wraps it (`_apply_autoscaling_config`, its delays
    read `time.time()`, faked here) against the model, tick by tick, on random loads."""
    settings = AutoscalingSettings(
        **{
            **FAST.__dict__,
            "max_replicas": 6,
            "upscale_delay_s": 0.5,
            "downscale_delay_s": 1.0,
            **fields,
        }
    )
    config = AutoscalingConfig(**settings.serve_config())
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(ray_policy, "time", SimpleNamespace(time=lambda: clock.now))
    wrapped = ray_policy._apply_autoscaling_config(
        ray_policy.replica_queue_length_autoscaling_policy
    )
    rng = random.Random(7)
    ray_target = model_target = settings.bounded(1)
    state: dict = {}
    delays = DelayState()
    current = model_target
    changes = 0
    total = 0.0
    for _ in range(1200):
        clock.now += 0.1
        if rng.random() < 0.04:  # the load changes every 2.5 s or so
            total = rng.choice([0.0, rng.uniform(0, 14)])
        before = model_target
        decision, state = wrapped(ray_context(total, current, ray_target, config, state))
        ray_target = max(config.min_replicas, min(config.max_replicas, int(decision)))
        cold = current == 0 and total > 0
        wish = None if cold else default_policy_wish(total, current, model_target, 2)
        model_target = decide(
            wish,
            current=current,
            target=model_target,
            total_ongoing=total,
            settings=settings,
            delays=delays,
            now=clock.now,
        )
        assert model_target == ray_target
        changes += model_target != before
        # Replicas follow the target a few ticks late, as they start and stop.
        if rng.random() < 0.3:
            current = model_target
    assert changes > 20  # the walk exercised scaling both ways


def test_the_handle_average_is_ray_merge_and_aggregate():
    """One handle's records against Ray's columnar merge (`merge_and_aggregate_arrays`),
    times on Ray's 10 ms grid: the queued series and one series per replica, replicas
    joining late and leaving."""
    rng = random.Random(11)
    for _ in range(50):
        records = []
        t = 100.0
        for _ in range(rng.randint(1, 12)):
            t = round(t + rng.choice([0.1, 0.2, 0.4]), 2)
            sent = {r: float(rng.randint(0, 5)) for r in ("a", "b", "c") if rng.random() < 0.8}
            records.append((t, float(rng.randint(0, 3)), sent))
        running = frozenset(r for r in ("a", "b", "c") if rng.random() < 0.7)
        now = round(t + rng.uniform(0, 1), 2)
        sources: list[list[tuple[float, float]]] = [[(t, q) for t, q, _ in records]]
        for replica in sorted(running):
            series = [(t, sent[replica]) for t, _, sent in records if replica in sent]
            if series:
                sources.append(series)
        ts = np.array([t for source in sources for t, _ in source])
        values = np.array([v for source in sources for _, v in source])
        offsets = np.cumsum([0] + [len(source) for source in sources])
        expected = merge_and_aggregate_arrays(ts, values, offsets, now, "mean")
        model = HandleReport(records).ongoing(running, now)
        assert model == pytest.approx(expected, abs=1e-9)


def test_a_pushed_series_averages_as_the_full_series_does():
    series = [(1.0, 2.0), (1.5, 0.0), (2.5, 4.0)]
    for now in (2.5, 3.0, 10.0):
        assert PushedSeries.of(series).mean(now) == pytest.approx(series_mean(series, now))


def test_a_replica_s_first_calls_run_slower_by_its_measured_warm_up():
    """Three 1 s calls one after another on each of two replicas up before the trace: the
    first two calls of each at its idle warm-up factors (2, 1.5), the third at full speed;
    a replica started during the trace takes `warmup` instead, and none without one."""
    arrivals = [0.0, 0.0, 2.5, 2.5, 4.5, 4.5]
    warm = Contention({(1, 0): 1.0}, warmup=(3.0,), warmup_idle=(2.0, 1.5))
    assert latencies(arrivals, warm) == [2.0, 2.0, 1.5, 1.5, 1.0, 1.0]
    assert latencies(arrivals, Contention({(1, 0): 1.0})) == [1.0] * 6
    assert warm.warm(0) == 3.0 and warm.warm(1) == 1.0 and warm.warm(1, idle=True) == 1.5
    assert Contention.from_json(warm.to_json()) == warm
    started = simulate(large_burst(), SERVICE, FAST, REPLICA, seed=1, contention=warm)
    idle_only = Contention({(1, 0): 1.0}, warmup_idle=(2.0, 1.5))
    plain = simulate(large_burst(), SERVICE, FAST, REPLICA, seed=1, contention=idle_only)
    assert started.decisions and plain.decisions
    assert started.summary()["p95_s"] > plain.summary()["p95_s"]


def test_a_request_waiting_minutes_at_the_handle_is_still_routed():
    """The router's backoff stays at its 0.5 s cap however long a request waits (an
    uncapped exponent overflowed after about 1,000 retries, some eight minutes)."""
    one = AutoscalingSettings(**{**FAST.__dict__, "min_replicas": 1, "max_replicas": 1})
    room = ReplicaSettings(max_ongoing_requests=1, max_queued_requests=10, start_s=5)
    long_call = ServiceModel(costs={("32x32", 1): CallCost(600.0, 0.0)}, source="test")
    trace = Trace("t", 1.0, (Arrival(0.0, SMALL, 0), Arrival(0.0, SMALL, 1)), "t")
    result = Simulation(trace, long_call, one, room, seed=1, drain_s=1300).run()
    assert sorted(r.latency_s for r in result.requests) == pytest.approx([600.0, 1200.5], abs=0.5)


def test_calls_and_overheads_vary_as_measured_around_the_same_means():
    """With a measured spread (calls at 0.5 or 1.5 of their mean seconds, overheads of 0 or
    0.2 s), a loaded replica's calls keep their mean, its requests' mean overhead is 0.1 s,
    and the tail grows, as queues behind long calls do; without it, every call of a batch
    size takes the same seconds and every overhead is the constant."""
    trace = burst(8, 8, 0, 0, 60, [(SMALL, 1)], seed=11)
    settings = AutoscalingSettings(**{**FAST.__dict__, "max_replicas": 1})
    plain = SERVICE.with_overhead(0.1)
    calls_vary = plain.with_spread([1.0, 3.0], [0.1])  # ratios rescaled to a mean of 1
    assert calls_vary.call_spread == (0.5, 1.5)

    def run(service: ServiceModel):
        answered = [r for r in simulate(trace, service, settings, REPLICA, 0).requests]
        answered = [r for r in answered if r.status == "ok"]
        calls = [round(r.done - r.overhead_s - r.call_began, 6) for r in answered]
        latencies = sorted(r.latency_s for r in answered)
        return calls, [r.overhead_s for r in answered], latencies[int(0.95 * len(latencies))]

    plain_calls, plain_overheads, plain_p95 = run(plain)
    spread_calls, _, spread_p95 = run(calls_vary)
    assert len(set(plain_calls)) <= 4 < len(set(spread_calls))  # one length a batch size
    assert np.mean(spread_calls) == pytest.approx(np.mean(plain_calls), rel=0.15)
    assert spread_p95 > 1.2 * plain_p95
    assert set(plain_overheads) == {0.1}
    _, overheads, _ = run(plain.with_spread([], [0.0, 0.2]))
    assert set(overheads) == {0.0, 0.2} and np.mean(overheads) == pytest.approx(0.1, abs=0.03)
