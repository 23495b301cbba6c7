"""Serve's side of the simulation: the metrics the handle and the replicas record and push,
and the controller deciding every control-loop tick from them, as `autoscaler.py` models
Ray's code; `simulation.py` runs the service it scales.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import simpy
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from bench.capacity.autoscaler import (
    CONTROL_LOOP_INTERVAL_S,
    AutoscalingSettings,
    DelayState,
    HandleReport,
    PushedSeries,
    decide,
    default_policy_wish,
)
from bench.capacity.replicas import Replica
from deployments.autoscaling_policy import JOBS_METRIC, WORK_METRIC, CostAwarePolicy

if TYPE_CHECKING:
    from bench.capacity.simulation import Simulation

DEPLOYMENT = DeploymentID(name="ImageGenerator:sim", app_name="sim")


class ServeController:
    """The handle's and replicas' metric loops and the control loop for one deployment:
    `target` is the replicas it asks for; `sim.scale_to` carries a new target out."""

    def __init__(
        self,
        sim: Simulation,
        settings: AutoscalingSettings,
        env: simpy.Environment,
        rng: random.Random,
    ) -> None:
        self.sim, self.settings, self.env, self.rng = sim, settings, env, rng
        self.target = settings.bounded(
            settings.initial_replicas
            if settings.initial_replicas is not None
            else settings.min_replicas
        )
        self.delays = DelayState()
        self.handle_recorded: list[tuple[float, float | None, dict[str, float]]] = []
        self.handle_report = HandleReport()
        self.decisions: list[tuple[float, int, int]] = []  # (time, old target, new target)
        self._policy = (
            CostAwarePolicy(settings.cost_target_step_pixels)
            if settings.cost_target_step_pixels is not None
            else None
        )
        self._config = AutoscalingConfig(**settings.serve_config())

    def handle_metrics(self):
        """The handle's recording and pushing loops (one process, the two intervals)."""
        settings = self.settings
        next_record = self.rng.uniform(0, settings.record_interval_s)
        next_push = self.rng.uniform(0, settings.metrics_interval_s)
        while True:
            now = self.env.now
            if now >= next_record - 1e-9:
                sent = {
                    r.id: float(len(r.ongoing))
                    for r in self.sim.replicas
                    if r.state == "running" or (r.state == "stopping" and r.ongoing)
                }
                self.handle_recorded.append((now, float(self.sim.waiting()), sent))
                next_record += settings.record_interval_s
            if now >= next_push - 1e-9:
                window = [
                    rec
                    for rec in self.handle_recorded
                    if rec[0] >= now - settings.look_back_period_s
                ]
                self.handle_recorded = window
                known = {r.id for r in self.sim.replicas if r.state == "running"}
                recorded = {replica for _, _, sent in window for replica in sent}
                fresh = {
                    r.id: float(len(r.ongoing))
                    for r in self.sim.replicas
                    if r.id in known - recorded
                }
                records: list[tuple[float, float | None, dict[str, float]]] = list(window)
                if fresh:  # a replica with no point yet is sent its count now
                    records.append((now, None, fresh))
                self.handle_report = HandleReport(records)
                next_push += settings.metrics_interval_s
            yield self.env.timeout(max(0.0, min(next_record, next_push) - self.env.now))

    def replica_metrics(self, replica: Replica):
        """A replica's `record_autoscaling_stats` loop: record, and push every interval."""
        settings = self.settings
        next_record = self.env.now
        next_push = self.env.now + settings.metrics_interval_s
        while replica.state != "gone":
            now = self.env.now
            if now >= next_record - 1e-9:
                work = sum(job.remaining_work(now) for job in replica.ongoing)
                replica.recorded.append((now, work, float(len(replica.ongoing))))
                next_record += settings.record_interval_s
            if now >= next_push - 1e-9:
                cutoff = now - settings.look_back_period_s
                replica.recorded = [p for p in replica.recorded if p[0] >= cutoff]
                replica.pushed_work = PushedSeries.of([(t, w) for t, w, _ in replica.recorded])
                replica.pushed_jobs = PushedSeries.of([(t, j) for t, _, j in replica.recorded])
                next_push += settings.metrics_interval_s
            yield self.env.timeout(max(0.0, min(next_record, next_push) - self.env.now))

    def _wish(self, running: list[Replica], ongoing: float) -> float:
        if self._policy is None:
            return default_policy_wish(
                ongoing, len(running), self.target, self.settings.target_ongoing_requests
            )
        now = self.env.now
        metrics: dict[str, dict[str, float]] = {WORK_METRIC: {}, JOBS_METRIC: {}}
        for r in running:
            if r.pushed_work is not None and r.pushed_jobs is not None:
                metrics[WORK_METRIC][r.id] = r.pushed_work.mean(now)
                metrics[JOBS_METRIC][r.id] = r.pushed_jobs.mean(now)
        ctx = AutoscalingContext(
            deployment_id=DEPLOYMENT,
            deployment_name=DEPLOYMENT.name,
            app_name=DEPLOYMENT.app_name,
            current_num_replicas=len(running),
            target_num_replicas=self.target,
            running_replicas=[r.id for r in running],
            total_num_requests=ongoing,
            total_queued_requests=self.handle_report.queued(now),
            aggregated_metrics=metrics,
            raw_metrics=None,
            capacity_adjusted_min_replicas=self.settings.min_replicas,
            capacity_adjusted_max_replicas=self.settings.max_replicas,
            policy_state={},
            last_scale_up_time=None,
            last_scale_down_time=None,
            current_time=now,
            config=self._config,
        )
        wish, _ = self._policy(ctx)
        return float(wish)

    def control_loop(self):
        """Serve's control loop: a decision every tick, from the metrics pushed by then."""
        while True:
            running = self.sim.running()
            ids = frozenset(r.id for r in running)
            ongoing = self.handle_report.ongoing(ids, self.env.now)
            cold = len(running) == 0 and ongoing > 0
            wish = None if cold else self._wish(running, ongoing)
            decision = decide(
                wish,
                current=len(running),
                target=self.target,
                total_ongoing=ongoing,
                settings=self.settings,
                delays=self.delays,
                now=self.env.now,
            )
            if decision != self.target:
                self.decisions.append((round(self.env.now, 3), self.target, decision))
                self.target = decision
                self.sim.scale_to(decision)
            yield self.env.timeout(CONTROL_LOOP_INTERVAL_S)
