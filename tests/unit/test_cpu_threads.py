"""The torch threads of each pipeline call on a CPU: every core alone, a share among others,
following the calls as they start and end."""

from __future__ import annotations

import threading

from deployments.generator.cpu_threads import CpuThreads


def test_a_call_alone_gets_every_core_and_concurrent_calls_their_share():
    settings: list[int] = []
    threads = CpuThreads(cores=4, workers=2, set_threads=settings.append)
    with threads.call() as first, threads.call() as second:
        pass
    with threads.call() as later:
        pass
    assert (first, second, later) == (4, 2, 4)


def test_the_share_is_at_least_one_thread():
    threads = CpuThreads(cores=2, workers=4, set_threads=lambda n: None)
    with threads.call() as alone, threads.call() as among:
        assert (alone, among) == (2, 1)


def in_thread(threads: CpuThreads, name: str):
    """A call held open in its own thread; `step` runs its rebalance there."""
    steps: list[threading.Event] = []
    entered, leave = threading.Event(), threading.Event()

    def run():
        with threads.call():
            entered.set()
            while not leave.is_set():
                if steps and not steps[-1].is_set():
                    threads.rebalance()
                    steps[-1].set()
                leave.wait(0.001)

    worker = threading.Thread(target=run, name=name)
    worker.start()
    entered.wait()

    def step():
        steps.append(threading.Event())
        steps[-1].wait()

    def end():
        leave.set()
        worker.join()

    return step, end


def test_a_running_call_follows_the_others_at_its_next_step():
    settings: list[tuple[str, int]] = []
    threads = CpuThreads(
        cores=2,
        workers=2,
        set_threads=lambda n: settings.append((threading.current_thread().name, n)),
    )
    first_step, first_end = in_thread(threads, "first")
    _, second_end = in_thread(threads, "second")
    first_step()  # the first learns that the second runs: down to its share
    second_end()
    first_step()  # alone again: every core
    first_step()  # nothing changed: nothing set
    first_end()
    assert settings == [("first", 2), ("second", 1), ("first", 1), ("first", 2)]
