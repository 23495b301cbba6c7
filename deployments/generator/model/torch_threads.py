"""Which threads of a replica run torch, and with how many threads of torch's own each.

On a CPU, torch parallelises an op with OpenMP (libgomp on Linux), and libgomp gives EVERY
thread that starts a parallel region its own team of threads, kept for as long as that
thread lives. Once a process holds more OpenMP threads than it has cores, libgomp cuts how
long an idle team thread spins before it sleeps, so that every op wakes sleeping threads.
A replica that loaded and warmed up its pipeline in one thread and then generated in another
paid that on every op. `python -m bench.engine.threads` on 2 cores (tiny-sd3, 8 steps, 2 torch
threads, seconds per call, each case a fresh process):

| where torch ran                                   | 64x64 x1 | 64x64 x8 | 256x256 x1 |
|---------------------------------------------------|----------|----------|------------|
| only one thread (not the main one)                | 0.078    | 0.323    | 0.147      |
| one small op in the main thread, then another one | 0.168    | 0.415    | 0.211      |

So the replica makes its worker pool first and loads, compiles and warms up the pipeline in
one of its threads (`run_in_pool`); afterwards only the pool's threads run torch, each with
`cores // worker_threads` torch threads, so their teams together never hold more threads
than the cores Ray assigned the replica.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

import ray
from ray.serve.context import _get_internal_replica_context

T = TypeVar("T")


def worker_pool(worker_threads: int) -> ThreadPoolExecutor:
    """The threads that will run every pipeline call of a replica."""
    return ThreadPoolExecutor(worker_threads, thread_name_prefix="generate")


def run_in_pool(pool: ThreadPoolExecutor, work: Callable[[], T]) -> T:
    """`work()` in one of the pool's threads (the constructor's load and warm-up), waited for."""
    return pool.submit(work).result()


def cpu_threads_per_call(worker_threads: int) -> int:
    """On a CPU, the replica's cores (those Ray assigned it) split among its worker threads.

    torch's intra-op threads are set per process: two concurrent pipeline calls that each
    use every core oversubscribe them. Measured on 2 cores with 16 clients of 64x64 images
    and two worker threads: batches of 8 took 0.8-1.0 s against 0.3 s alone, and one thread
    per call raised throughput from about 13 to 17-20 images/s.
    """
    assigned = None
    if _get_internal_replica_context() is not None:  # in a Serve replica, not a test
        assigned = ray.get_runtime_context().get_assigned_resources().get("CPU")
    cores = int(assigned) if assigned else (os.cpu_count() or 1)
    return max(1, cores // worker_threads)


class CountingExecutor(Executor):
    """The worker pool as the request-level batch queue submits to it, counting the
    batches submitted that no thread has started yet."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self.waiting = 0

    def has_waiting(self) -> bool:
        """Whether a submitted batch waits for a thread (a loop lane then yields its own)."""
        return self.waiting > 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            self.waiting += 1

        def started() -> Any:
            with self._lock:
                self.waiting -= 1
            return fn(*args, **kwargs)

        return self._pool.submit(started)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
