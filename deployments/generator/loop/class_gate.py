"""Which priority class steps now, across a replica's lanes (`batching.preempt_lower_classes`).

Without it, a step runs every image of its group whatever its class, so on a device where a
step's cost grows with its images a high-class image takes as long per step as the
low-class images beside it make it. With it, each lane publishes the most urgent effective
class among its images in flight (`JobSchedule.effective_rank`: aging counts), and a step
runs only the images of the most urgent class published by any lane; the others wait at the
step boundary, their latents and schedulers kept, and a lane with nothing of that class
waits too. Across lanes, not per lane: the lanes' threads share the replica's cores (and a
GPU's), so a lane of low-class images going on beside the high class's takes the compute
the high class needs (measured on the CPU benchmark: deciding per lane, the high class's p95
under a low-class flood was 30x its unloaded p95; across lanes, 2x). It is step-level
preemption: nothing is lost, only delayed, and aging bounds the delay as it bounds a lower
class's wait in the queue.
"""

from __future__ import annotations

import threading

# How long a lane with nothing to step waits before it looks again (a published change wakes
# it at once; this bounds a wake-up missed between its look and its wait).
PAUSE_S = 0.05


class ClassGate:
    """The most urgent class each lane holds in flight; safe from any thread."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._ranks: dict[int, int] = {}  # by lane (its id): its most urgent rank in flight

    def publish(self, lane: object, rank: int | None) -> None:
        """`lane`'s most urgent rank in flight now (None: it holds nothing in flight)."""
        with self._changed:
            before = self._ranks.get(id(lane))
            if rank is None:
                self._ranks.pop(id(lane), None)
            else:
                self._ranks[id(lane)] = rank
            if rank != before:
                self._changed.notify_all()

    def top(self) -> int | None:
        """The most urgent rank in flight in any lane (None: nothing in flight)."""
        with self._changed:
            return min(self._ranks.values(), default=None)

    def pause(self) -> None:
        """Wait until a lane publishes a change, or `PAUSE_S`."""
        with self._changed:
            self._changed.wait(PAUSE_S)
