"""Which threads of a replica run torch, and with how many threads of torch's own each.

On a CPU, torch parallelises an op with OpenMP (libgomp on Linux), and libgomp gives EVERY
thread that starts a parallel region its own team of threads, kept for as long as that
thread lives. Once a process holds more OpenMP threads than it has cores, libgomp cuts how
long an idle team thread spins before it sleeps, so that every op wakes sleeping threads.
A replica that loaded and warmed up its pipeline in one thread and then generated in another
paid that on every op. Measured on 2 cores (tiny-sd3, 8 steps, 2 torch threads, best of 4):

| where torch ran                               | 64x64 x1 | 64x64 x8 | 256x256 x1 |
|-----------------------------------------------|----------|----------|------------|
| everything in the main thread                 | 0.078 s  | 0.357 s  | 0.143 s    |
| everything in one other thread                | 0.099 s  | 0.336 s  | 0.143 s    |
| a small op in the main thread, the rest in another | 0.142 s | 0.416 s | 0.253 s |

So the replica makes its worker pool first and loads, compiles and warms up the pipeline in
one of its threads (`run_in_pool`); afterwards only the pool's threads run torch. A CPU
replica whose pool has one thread (`worker_threads: 1`) then has a single OpenMP team, with
every core it was given: concurrency comes from batching, not from threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

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
