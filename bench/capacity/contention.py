"""How much slower a pipeline call runs than its standalone measurement, by what shares the
cores with it: the calls running at once (on every replica), the replicas starting, and the
requests waiting at the handle (the router's retries and probes, the ingress holding them).

This exists for the validation's stand-in only: there every "GPU" replica, the proxy, the
ingress and the load's client share one machine's two cores, so a call runs slower when the
other replica is busy too, and slower again while a new replica loads its model and warms
up. The factors are measured on the cluster itself (`bench/capacity/calibrate.py`), never
fitted to the traces they are checked against. On real GPU nodes a replica has its device
to itself, and the extrapolation runs with no contention (every factor 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Contention:
    """Slowdown factors by (calls running, replicas starting); a call's standalone seconds
    times the factor of the moment is how fast it progresses. Unmeasured states take the
    nearest measured calls and starts, combined as the product of their separate effects."""

    slowdowns: dict[tuple[int, int], float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    # (requests waiting at the handle, the factor on top of the rest then), measured at one
    # or more backlogs, fewest first: between none waiting (1) and the measured points it is
    # interpolated, beyond the last it stays there (nothing measured says how it goes on).
    backlog: tuple[tuple[int, float], ...] = ()
    # A replica's first calls, each slower than its later ones under the same load by this
    # factor, the first call first; from then on 1. `warmup` for a replica that starts
    # during the trace (loaded once it runs), `warmup_idle` for one that was up and idle
    # before it (the trace's first replicas).
    warmup: tuple[float, ...] = ()
    warmup_idle: tuple[float, ...] = ()

    def warm(self, served: int, idle: bool = False) -> float:
        """The factor on a replica's call after `served` calls of its own."""
        factors = self.warmup_idle if idle else self.warmup
        return factors[served] if served < len(factors) else 1.0

    def factor(self, calls: int, starting: int, queued: int = 0) -> float:
        if not self.slowdowns:
            return 1.0
        base = self._factor(calls, starting)
        return base if queued <= 0 else base * self.backlog_factor(queued)

    def backlog_factor(self, queued: int) -> float:
        """The factor `queued` requests waiting at the handle put on top of the rest."""
        below, low = 0, 1.0
        for measured, extra in self.backlog:
            if queued <= measured:
                return low + (extra - low) * (queued - below) / (measured - below)
            below, low = measured, extra
        return low

    def _factor(self, calls: int, starting: int) -> float:
        calls = max(1, calls)
        if (calls, starting) in self.slowdowns:
            return self.slowdowns[(calls, starting)]
        busy = self._nearest(calls, [c for c, s in self.slowdowns if s == 0])
        base = self.slowdowns.get((busy, 0), 1.0)
        if starting == 0:
            return base
        starts = [s for c, s in self.slowdowns if s > 0]
        if not starts:
            return base
        start = self._nearest(starting, starts)
        with_start = [(c, s) for c, s in self.slowdowns if s == start]
        one, _ = min(with_start, key=lambda key: abs(key[0] - calls))
        alone = self.slowdowns.get((one, 0), 1.0)
        return base * self.slowdowns[(one, start)] / alone

    @staticmethod
    def _nearest(value: int, measured: list[int]) -> int:
        if not measured:
            return value
        return min(measured, key=lambda m: (abs(m - value), -m))

    def at_speed(self, probe_factor: float) -> Contention:
        """The same contention on a machine running a lone call at `probe_factor` instead of
        the calibrated one: every slowdown scaled by their ratio, the relative effects (the
        backlog's, the warm-up's) kept; and the first replicas warm, as the probe that
        measured it left them."""
        lone = self.slowdowns.get((1, 0))
        if not lone:
            return self
        ratio = probe_factor / lone
        slowdowns = {key: round(factor * ratio, 4) for key, factor in self.slowdowns.items()}
        notes = {**self.notes, "probe_factor": probe_factor}
        return replace(self, slowdowns=slowdowns, notes=notes, warmup_idle=())

    def to_json(self) -> dict[str, Any]:
        return {
            "notes": self.notes,
            "backlog": [list(point) for point in self.backlog],
            "warmup": list(self.warmup),
            "warmup_idle": list(self.warmup_idle),
            "slowdowns": [
                {"calls": calls, "starting": starting, "factor": factor}
                for (calls, starting), factor in sorted(self.slowdowns.items())
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Contention:
        if not data:
            return cls()
        slowdowns = {(row["calls"], row["starting"]): row["factor"] for row in data["slowdowns"]}
        backlog = data.get("backlog") or ()
        if backlog and not isinstance(backlog[0], list):  # one point, as files before 2026-12-08
            backlog = [backlog]
        return cls(
            slowdowns,
            data.get("notes", {}),
            tuple((int(queued), float(extra)) for queued, extra in backlog),
            tuple(data.get("warmup", ())),
            tuple(data.get("warmup_idle", ())),
        )


NONE = Contention()
