"""How many torch threads a pipeline call on a CPU uses.

A call that runs alone gets all the replica's cores: a lone request should not leave half
the machine idle. While other calls run, each gets its share, `cores // worker_threads`, so
that concurrent batches do not oversubscribe the cores. The split follows the calls: a call
sets its count as it starts, and again after each denoising step if the number of running
calls has changed since (`rebalance`), so a call that started beside another takes every
core once it is alone, and gives them back when the next starts.

`torch.set_num_threads` is not a per-call setting: with torch's OpenMP backend it sets the
calling thread's OpenMP thread count and MKL's process-wide one (and the default of threads
that have not run a parallel op yet). Each call therefore sets it itself, from its own
worker thread; the latest setting wins for MKL's matrix products until the others catch up
at their next step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class CpuThreads:
    """Sets the torch threads of each pipeline call: `cores` alone, `cores // workers`
    among others."""

    def __init__(
        self,
        cores: int,
        workers: int,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        self.cores = max(1, cores)
        self.share = max(1, self.cores // max(1, workers))
        self._set_threads = set_threads
        self._lock = threading.Lock()
        self._running = 0
        self._mine = threading.local()  # the count this worker thread last set

    @contextmanager
    def call(self) -> Iterator[int]:
        """Around one pipeline call, in its worker thread: the threads it starts with."""
        with self._lock:
            self._running += 1
        try:
            yield self.rebalance()
        finally:
            with self._lock:
                self._running -= 1
            self._mine.threads = None

    def rebalance(self) -> int:
        """In a running call's worker thread (between steps): its count for the calls that
        run now, set if it changed."""
        with self._lock:
            threads = self.cores if self._running == 1 else self.share
        if getattr(self._mine, "threads", None) != threads:
            self._set_threads(threads)
            self._mine.threads = threads
        return threads
