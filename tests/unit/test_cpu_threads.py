"""The torch threads of each pipeline call on a CPU: every core alone, a share among others."""

from __future__ import annotations

import threading

from deployments.generator.cpu_threads import CpuThreads


def test_a_call_alone_gets_every_core_and_concurrent_calls_their_share():
    settings: list[int] = []
    threads = CpuThreads(cores=4, workers=2, set_threads=settings.append)
    with threads.call() as first:
        with threads.call() as second:
            pass
    with threads.call() as later:
        pass
    assert (first, second, later) == (4, 2, 4)
    assert settings == [4, 2, 4]  # each call sets its own count as it starts


def test_the_share_is_at_least_one_thread():
    threads = CpuThreads(cores=2, workers=4, set_threads=lambda n: None)
    with threads.call() as alone, threads.call() as among:
        assert (alone, among) == (2, 1)


def test_calls_are_counted_across_threads():
    threads = CpuThreads(cores=2, workers=2, set_threads=lambda n: None)
    inside, leave = threading.Event(), threading.Event()

    def hold():
        with threads.call():
            inside.set()
            leave.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait()
    with threads.call() as among:
        assert among == 1
    leave.set()
    holder.join()
    with threads.call() as alone:
        assert alone == 2
