"""Refusing a job that cannot finish by its deadline, before any compute.

A replica measures the rate at which it gets work done (`ServiceRate`: denoising steps x
pixels per second of time it holds work, the same units as the cost-aware autoscaler's
held work). A job arriving with `refuse_late` is refused when the work that would run
before it (held work of its class and higher, and started work of any class that will not
pause for it: what its place in line puts ahead of it) plus its own, at that rate, ends
after its deadline. The caller gets a retryable 503 with
`retry-after` set to how late it would have been: by then, the work ahead is that much less.

The rate is the median of the last few busy windows (`RECENT_WINDOWS` of `MIN_WINDOW_S` each:
about 10 s of work), so it follows the load the replica runs now: under an overload the
rate it had when calmer would admit work it cannot finish (measured: with the best of 30
windows, a flood's admitted requests still timed out by the hundred). A median rather than
the last window, so that one slow window (a start, a pause) does not refuse a burst. With no
window measured yet (a replica that has not worked for `MIN_WINDOW_S`), nothing is refused.

This is the admission test of a queue with deadlines: the work ahead of a job in a
non-preemptive priority queue (`job_schedule.py`) is known when it arrives, and a server of
rate mu finishes it by `now + (ahead + own) / mu`; a job that fails the test would only hold
the line for the jobs behind it and then time out.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from dataclasses import dataclass

from deployments.scheduling.job_schedule import JobSchedule

# Busy seconds of one window of the rate, and how many recent windows its median is taken from.
MIN_WINDOW_S = 2.0
RECENT_WINDOWS = 5
# The most seconds `retry-after` says.
MAX_RETRY_AFTER_S = 60


class ServiceRate:
    """Work done per second of time holding work, over recent windows; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy_total = 0.0  # seconds held in ended busy periods
        self._busy_since: float | None = None  # start of the current busy period
        self._window_busy = 0.0  # the current window's busy seconds, at its start
        self._window_done = 0.0  # work done in the current window
        self._rates: deque[float] = deque(maxlen=RECENT_WINDOWS)

    def busy(self, holding: bool, now: float) -> None:
        """The replica began (True) or stopped (False) holding work at `now`."""
        with self._lock:
            if holding and self._busy_since is None:
                self._busy_since = now
            elif not holding and self._busy_since is not None:
                self._busy_total += now - self._busy_since
                self._busy_since = None

    def done(self, work: float, now: float) -> None:
        """`work` (steps x pixels) got done at `now`."""
        with self._lock:
            self._window_done += work
            clock = self._clock(now)
            span = clock - self._window_busy
            if span >= MIN_WINDOW_S:
                self._rates.append(self._window_done / span)
                self._window_busy = clock
                self._window_done = 0.0

    def recent(self) -> float | None:
        """Work per second, the median of the recent windows; None before one has ended."""
        with self._lock:
            return statistics.median(self._rates) if self._rates else None

    def _clock(self, now: float) -> float:
        ongoing = now - self._busy_since if self._busy_since is not None else 0.0
        return self._busy_total + ongoing


@dataclass(frozen=True)
class TooLate:
    """A job that cannot finish in time: by how many seconds it would miss its deadline."""

    late_s: float
    finish_s: float  # its estimated finish, seconds from now
    remaining_s: float  # seconds to its deadline

    @property
    def retry_after_s(self) -> int:
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.late_s)))


def too_late(
    schedule: JobSchedule, own_work: float, ahead_work: float, rate: float | None, now: float
) -> TooLate | None:
    """Whether a job of `own_work` with `ahead_work` before it misses its deadline at `rate`
    (None: it may make it, or there is no rate to tell, or it asks not to be refused)."""
    if not schedule.refuse_late or not math.isfinite(schedule.deadline) or not rate:
        return None
    finish_s = (ahead_work + own_work) / rate
    remaining_s = schedule.remaining_s(now)
    if finish_s <= remaining_s:
        return None
    return TooLate(late_s=finish_s - remaining_s, finish_s=finish_s, remaining_s=remaining_s)
