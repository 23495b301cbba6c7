"""A model of Ray Serve's autoscaler (Ray 2.60), for the simulation: how the load is
measured, aggregated and turned into a replica count. Written from Ray's code, not copied;
each part names the function it models (under `ray/serve/`).

Measuring (`_private/router.py`, `RouterMetricsManager`; `_private/replica.py`,
`ReplicaMetricsManager`):
- a handle records its queued requests and the requests it has sent to each replica and not
  yet had back, every `min(look_back_period_s * 0.2, metrics_interval_s)` seconds
  (`_add_autoscaling_metrics_point`; the 0.2 is
  `RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR`), and every `metrics_interval_s`
  sends the controller what it recorded in the last `look_back_period_s`
  (`push_autoscaling_metrics_to_controller`, `_get_metrics_report`: a replica without a
  point yet is sent its current count at the push's time);
- a replica with `record_autoscaling_stats` records what it returns at the same interval
  and sends it the same way (`_add_autoscaling_metrics_point_async`,
  `_push_autoscaling_metrics`).
Aggregating (`_private/autoscaling_state.py`, `DeploymentAutoscalingState`):
- ongoing requests: the handles' running series of the replicas still running plus their
  queued series, summed as step functions (`merge_instantaneous_total`) and averaged over
  time from the latest first point among them (when there are several) to now, the last
  value holding until now (`_merge_and_aggregate_timeseries`, `merge_and_aggregate_arrays`
  in `_private/autoscaling_metrics_merge.py`); Ray rounds the merged times to 10 ms, this
  model does not;
- a replica's custom metric: its own series averaged the same way
  (`_get_aggregated_custom_metrics`).
Deciding, every control-loop tick (`CONTROL_LOOP_INTERVAL_S`, 0.1 s;
`DeploymentAutoscalingState.get_decision_num_replicas`):
- the policy's wish: Serve's default is ongoing requests / `target_ongoing_requests`
  (`_core_replica_queue_length_policy`), the cost-aware one is the project's own policy,
  called as such (`deployments/autoscaling_policy.py`);
- from zero replicas with a request waiting, at once at least one
  (`_get_cold_start_scale_up_replicas`);
- the factors: current + factor x (wish - current), rounded up, and a downscale stuck by
  the factor steps down by one (`_apply_scaling_factors`);
- the delays: a change happens once the wish has pointed the same way for `upscale_delay_s`
  (or `downscale_delay_s`, or `downscale_to_zero_delay_s` from one to zero) of wall-clock
  time; a wish equal to the target, or the other way, starts the wait over
  (`_apply_delay_logic`: in 2.60 it compares timestamps, its counter only keeps the
  direction);
- the bounds: `min_replicas` <= replicas <= `max_replicas` (`apply_bounds`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# ray.serve._private.constants: CONTROL_LOOP_INTERVAL_S and
# RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR (their defaults).
CONTROL_LOOP_INTERVAL_S = 0.1
METRIC_RECORD_INTERVAL_FACTOR = 0.2
# `_DELAY_ELAPSED_EPS_S` of `ray.serve.autoscaling_policy`: float slack on elapsed delays.
DELAY_EPS_S = 1e-6


@dataclass(frozen=True)
class AutoscalingSettings:
    """The fields of Serve's `autoscaling_config` the model uses (Serve's defaults), and the
    policy: Serve's default, or cost-aware with its target in steps x pixels."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0
    cost_target_step_pixels: float | None = None  # None: Serve's default policy

    @property
    def record_interval_s(self) -> float:
        return min(self.look_back_period_s * METRIC_RECORD_INTERVAL_FACTOR, self.metrics_interval_s)

    @property
    def policy_name(self) -> str:
        return "default" if self.cost_target_step_pixels is None else "cost_aware"

    def serve_config(self) -> dict[str, Any]:
        """The same settings as a Serve `autoscaling_config` (without the policy)."""
        config: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "upscaling_factor": self.upscaling_factor,
            "downscaling_factor": self.downscaling_factor,
            "look_back_period_s": self.look_back_period_s,
            "metrics_interval_s": self.metrics_interval_s,
        }
        if self.initial_replicas is not None:
            config["initial_replicas"] = self.initial_replicas
        if self.downscale_to_zero_delay_s is not None:
            config["downscale_to_zero_delay_s"] = self.downscale_to_zero_delay_s
        return config

    def bounded(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


Series = Sequence[tuple[float, float]]  # (time, value), sorted by time


def step_mean(series: Series, start: float, now: float) -> float:
    """The mean over [start, end) of the step function `series` (each value holds until the
    next; 0 before the first), end being `now`, or just past the last point if `now` is
    not after it (`time_weighted_average`)."""
    if not series:
        return 0.0
    end = now if now > series[-1][0] else series[-1][0] + 1e-3
    if end <= start:
        return 0.0
    total = 0.0
    value = 0.0
    at = start
    for t, v in series:
        if t > at:
            total += value * (t - at)
            at = t
        value = v
    total += value * (end - at)
    return total / (end - start)


def series_mean(series: Series, now: float) -> float:
    """One source's window mean: from its first point to now."""
    return step_mean(series, series[0][0], now) if series else 0.0


@dataclass(frozen=True)
class PushedSeries:
    """One source's pushed series, reduced to what its window mean needs at any later
    time: `series_mean(series, now)` in O(1) (the controller asks every tick)."""

    start: float
    integral: float  # of the step function from `start` to `last_t`
    last_t: float
    last_v: float

    @classmethod
    def of(cls, series: Series) -> PushedSeries | None:
        if not series:
            return None
        integral = sum(v * (t_next - t) for (t, v), (t_next, _) in itertools.pairwise(series))
        return cls(series[0][0], integral, series[-1][0], series[-1][1])

    def mean(self, now: float) -> float:
        end = now if now > self.last_t else self.last_t + 1e-3
        return (self.integral + self.last_v * (end - self.last_t)) / (end - self.start)


@dataclass
class HandleReport:
    """What one handle last sent: its records in the window, each (time, queued, {replica:
    sent and not back}). A handle records every source at the same instants, except at the
    push, where a replica without a point yet gets its current count alone (queued None:
    no queued point then)."""

    records: list[tuple[float, float | None, dict[str, float]]] = field(default_factory=list)
    _cache: dict[frozenset[str], PushedSeries | None] = field(default_factory=dict, repr=False)

    def first_points(self, running: frozenset[str]) -> list[float]:
        """The first time of each non-empty source: the queued series and each running
        replica's series."""
        firsts: dict[str, float] = {}
        for t, queued, sent in self.records:
            if queued is not None:
                firsts.setdefault("", t)
            for replica in sent:
                if replica in running:
                    firsts.setdefault(replica, t)
        return list(firsts.values())

    def total_series(self, running: frozenset[str]) -> list[tuple[float, float]]:
        """The queued series plus the running replicas' series, each holding its last value
        until its next point (`merge_instantaneous_total`)."""
        last: dict[str, float] = {}
        series = []
        for t, queued, sent in self.records:
            if queued is not None:
                last[""] = queued
            for replica, value in sent.items():
                if replica in running:
                    last[replica] = value
            series.append((t, sum(last.values())))
        return series

    def ongoing(self, running: frozenset[str], now: float) -> float:
        """`get_total_num_requests` for one handle: the merged series' mean from the latest
        first point among its sources (if several) to now."""
        if running not in self._cache:
            series = self.total_series(running)
            pushed = None
            if series:
                start = series[0][0]
                firsts = self.first_points(running)
                if len(firsts) > 1 and max(firsts) <= series[-1][0]:
                    start = max(max(firsts), start)
                # Points before `start` only set the value the mean starts from.
                pushed = PushedSeries.of([(max(t, start), v) for t, v in series])
            self._cache[running] = pushed
        pushed = self._cache[running]
        return 0.0 if pushed is None else pushed.mean(now)

    def queued(self, now: float) -> float:
        """`_get_queued_requests` for one handle: its queued series alone."""
        return series_mean([(t, q) for t, q, _ in self.records if q is not None], now)


def default_policy_wish(total_ongoing: float, current: int, target: int, target_ongoing: float):
    """`_core_replica_queue_length_policy`: current x total / (target x current)."""
    if current == 0:
        return float(target)
    return current * (total_ongoing / (target_ongoing * current))


def apply_scaling_factors(wish: float, current: int, settings: AutoscalingSettings) -> int:
    """`_apply_scaling_factors`."""
    if current == 0:
        return math.ceil(wish)
    delta = wish - current
    factor = settings.upscaling_factor if delta > 0 else settings.downscaling_factor
    scaled = math.ceil(current + factor * delta)
    if math.ceil(wish) < current and scaled == current:
        scaled -= 1
    return scaled


@dataclass
class DelayState:
    """`_apply_delay_logic`'s state: the direction of the wish (+1, -1, 0) and since when
    it has pointed that way."""

    direction: int = 0
    since: float | None = None

    def apply(self, wish: int, target: int, settings: AutoscalingSettings, now: float) -> int:
        if wish == target:
            self.direction, self.since = 0, None
            return target
        direction = 1 if wish > target else -1
        if direction != self.direction:
            self.direction, self.since = direction, None
        if self.since is None:
            self.since = now
        if direction > 0:
            delay = settings.upscale_delay_s
        elif target == 1 and settings.downscale_to_zero_delay_s is not None:
            delay = settings.downscale_to_zero_delay_s
        else:
            delay = settings.downscale_delay_s
        if direction < 0 and target != 1:
            wish = max(1, wish)  # only 1 -> 0 may reach zero
        if now - self.since + DELAY_EPS_S >= delay:
            self.direction, self.since = 0, None
            return wish
        return target


def decide(
    wish: float | None,
    *,
    current: int,
    target: int,
    total_ongoing: float,
    settings: AutoscalingSettings,
    delays: DelayState,
    now: float,
) -> int:
    """The target replica count after one tick: Serve's wrapper around a policy
    (`_apply_autoscaling_config`, `_apply_default_params`) and `apply_bounds`. `wish` is the
    policy's raw answer; None only on the cold-start path, where it is not asked."""
    if current == 0 and total_ongoing > 0:  # `_get_cold_start_scale_up_replicas`
        return settings.bounded(max(math.ceil(settings.upscaling_factor), target))
    assert wish is not None
    scaled = apply_scaling_factors(wish, current, settings)
    if current == 0 and scaled > 0:
        return settings.bounded(scaled)
    return settings.bounded(delays.apply(max(0, scaled), target, settings, now))


def replica_seconds(timeline: Iterable[tuple[float, int]], end: float) -> float:
    """The integral of a replica count given as (time, count) changes, up to `end`."""
    total = 0.0
    last_t, last_n = None, 0
    for t, n in timeline:
        if last_t is not None:
            total += last_n * (min(t, end) - last_t)
        last_t, last_n = t, n
        if t >= end:
            break
    if last_t is not None and last_t < end:
        total += last_n * (end - last_t)
    return total
