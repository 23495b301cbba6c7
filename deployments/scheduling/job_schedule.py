"""A job's place in line: its priority class, when it arrived, and by when it is needed.

A replica's waiting work (the batch queue's batches, each lane's inbox) starts in the order
of `JobSchedule.urgency`: the higher class first, then the earlier deadline, then the earlier
arrival. It is a non-preemptive priority queue: a started batch or a job already in the
continuous loop runs to its end, so a job waits for the work running when it came (batches,
or the loop's images in flight) and for the waiting work ranked before it, never for waiting
work of a lower class that has not aged to its own. (With `batching.preempt_lower_classes`
the continuous loop also pauses lower classes' images in flight at each step boundary:
`deployments/generator/loop/class_gate.py`.)

Aging keeps a lower class from waiting forever: every `aging_s` a job waits, it counts as
one class higher, down to the highest. Under a flood of low-class work a high-class job
waits behind at most the low-class jobs that have waited `rank x aging_s` longer than it,
and each low-class job is started within about `rank x aging_s` of its arrival plus the
high-class work that came before it, whatever the load (or refused at once if it cannot
finish by its deadline: `deadline_admission.py`).

Times are wall-clock (`time.time()`): the ingress stamps them and the replica, another
process and perhaps another node, reads them (Kubernetes nodes keep their clocks within
milliseconds with NTP; a skew shows up as that much error in aging and deadlines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class JobSchedule:
    """When a job should run. The default is a job of the one class with no deadline."""

    # The class's name (the metrics' `priority` label) and rank (0: the highest).
    priority_class: str = "normal"
    rank: int = 0
    # `time.time()` when the request reached the ingress, and when its caller stops
    # waiting for the answer (its timeout).
    arrived: float = 0.0
    deadline: float = math.inf
    # Seconds of waiting per class gained (`SchedulingConfig.aging_s`).
    aging_s: float = math.inf
    # Refuse the job before any compute if it cannot finish by its deadline.
    refuse_late: bool = False

    def effective_rank(self, now: float) -> int:
        """Its rank after aging: one class higher for each `aging_s` waited."""
        if not math.isfinite(self.aging_s):
            return self.rank
        return max(0, self.rank - int(max(0.0, now - self.arrived) // self.aging_s))

    def urgency(self, now: float) -> tuple[int, float, float]:
        """The key waiting work is started in, smallest first."""
        return (self.effective_rank(now), self.deadline, self.arrived)

    def remaining_s(self, now: float) -> float:
        return self.deadline - now


UNSCHEDULED = JobSchedule()
