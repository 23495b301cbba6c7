"""How many torch threads a pipeline call on a CPU uses.

A call that runs alone gets all the replica's cores: a lone request should not leave half
the machine idle. A call that starts while another runs gets its share, `cores //
worker_threads`, so that concurrent batches do not oversubscribe the cores.

`torch.set_num_threads` is not a per-call setting: with torch's OpenMP backend it sets the
calling thread's OpenMP thread count and MKL's process-wide one (and the default of threads
that have not run a parallel op yet). Each call therefore sets it itself, from its own
worker thread, when it starts. The later call's setting wins for MKL's matrix products, so
a call that began alone with every core drops to its share in them once another call
starts; its other ops keep their count until it ends, a short overlap.
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

    @contextmanager
    def call(self) -> Iterator[int]:
        """Around one pipeline call, in its worker thread: the threads it runs with."""
        with self._lock:
            self._running += 1
            threads = self.cores if self._running == 1 else self.share
            self._set_threads(threads)
        try:
            yield threads
        finally:
            with self._lock:
                self._running -= 1
