"""The batching policy, with a fake batch runner: what runs together, and what never does."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from deployments.config.model_config import BatchingConfig
from deployments.generator.calls import batching
from deployments.generator.calls.batching import BatchQueue, QueuedJob, batch_key
from deployments.jobs import GeneratedImages, GenerationJob
from tests.jobs import make_job


def job(
    seed: int,
    *,
    size: int = 64,
    n: int = 1,
    prompt: str = "p",
    negative: str | None = None,
    steps: int = 4,
) -> GenerationJob:
    return make_job(
        seed,
        n=n,
        prompt=prompt,
        negative_prompt=negative,
        width=size,
        height=size,
        num_inference_steps=steps,
    )


class FakeRunner:
    """Runs batches instantly, or holds each until released. A prompt 'fail' fails its
    whole batch (raised); a prompt 'own failure' fails its own job only (answered)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, ...]]] = []
        self.entries: list[list[QueuedJob]] = []
        self.cancel_flags: list[threading.Event] = []
        self._holding = False
        self._gates = [threading.Event() for _ in range(64)]

    def hold(self) -> None:
        """Batches started from now on wait until released."""
        self._holding = True

    def release(self, index: int | None = None) -> None:
        """Let batch `index` finish, or every batch (and stop holding) when None."""
        if index is not None:
            self._gates[index].set()
            return
        self._holding = False
        for gate in self._gates:
            gate.set()

    def __call__(self, queued: list[QueuedJob], cancelled: threading.Event):
        index = len(self.batches)
        jobs = [entry.job for entry in queued]
        self.batches.append([j.seeds for j in jobs])
        self.entries.append(queued)
        self.cancel_flags.append(cancelled)
        if self._holding:
            self._gates[index].wait(timeout=10)
        if any(j.prompt == "fail" for j in jobs):
            raise ValueError("this batch failed")
        return [
            ValueError(f"job {j.seeds} failed")
            if j.prompt == "own failure"
            else GeneratedImages(
                images=[np.zeros((1, 1, 3), np.uint8)] * j.num_images, seeds=j.seeds
            )
            for j in jobs
        ]


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


def make_queue(runner, workers=1, max_images=8, max_wait_ms=20.0, max_pixels=1 << 30):
    """A queue on its own pool; by default the pixel budget is too large to matter."""
    settings = BatchingConfig(
        max_batch_images=max_images, max_wait_ms=max_wait_ms, max_batch_pixels=max_pixels
    )
    return BatchQueue(runner, ThreadPoolExecutor(workers), workers=workers, settings=settings)


async def started(runner: FakeRunner, count: int) -> None:
    while len(runner.batches) < count:
        await asyncio.sleep(0.001)


def behind_a_busy_worker(queue: BatchQueue, runner: FakeRunner, jobs: list[GenerationJob]):
    """Hold job 0 on the only worker, submit `jobs` meanwhile, then let everything finish.

    Returns job 0's result followed by each job's result (or exception), in order.
    """

    async def scenario():
        runner.hold()
        blocker = asyncio.create_task(queue.submit(job(0)))
        await started(runner, 1)
        tasks = [asyncio.create_task(queue.submit(j)) for j in jobs]
        await asyncio.sleep(0.05)
        runner.release()
        return await asyncio.gather(blocker, *tasks, return_exceptions=True)

    return asyncio.run(scenario())


def test_compatible_means_same_call_parameters():
    assert batch_key(job(1, prompt="a")) == batch_key(job(2, prompt="b", n=3))
    assert batch_key(job(1)) != batch_key(job(1, size=32))
    assert batch_key(job(1)) != batch_key(job(1, steps=5))
    assert batch_key(job(1, negative="x")) == batch_key(job(1, negative="y"))
    assert batch_key(job(1)) != batch_key(job(1, negative=""))


def test_an_idle_replica_starts_a_lone_job_without_waiting(runner):
    async def scenario():
        # The longest window the settings allow: a lone job must not sit through it.
        queue = make_queue(runner, max_wait_ms=1000)
        return await asyncio.wait_for(queue.submit(job(5)), timeout=0.5)

    assert asyncio.run(scenario()).seeds == (5,)


def test_jobs_arriving_while_busy_share_one_batch_and_get_their_own_results(runner):
    queue = make_queue(runner)
    results = behind_a_busy_worker(queue, runner, [job(seed, n=2) for seed in (10, 20, 30)])
    assert runner.batches == [[(0,)], [(10, 11), (20, 21), (30, 31)]]
    assert list(queue.batch_sizes) == [1, 6]
    assert [result.seeds for result in results] == [(0,), (10, 11), (20, 21), (30, 31)]
    assert [len(result.images) for result in results] == [1, 2, 2, 2]


def test_incompatible_jobs_form_separate_batches(runner):
    jobs = [job(seed, size=size) for seed, size in ((1, 32), (2, 64), (3, 32), (4, 64))]
    behind_a_busy_worker(make_queue(runner), runner, jobs)
    assert sorted(runner.batches[1:]) == [[(1,), (3,)], [(2,), (4,)]]


def test_batches_never_exceed_the_maximum_and_big_jobs_run_alone(runner):
    queue = make_queue(runner, max_images=4)
    behind_a_busy_worker(queue, runner, [*(job(seed) for seed in range(1, 10)), job(100, n=6)])
    assert max(size for size in queue.batch_sizes if size != 6) <= 4
    assert [(100, 101, 102, 103, 104, 105)] in runner.batches
    assert sum(queue.batch_sizes) == 16


def test_a_maximum_of_one_runs_every_job_alone(runner):
    async def scenario():
        queue = make_queue(runner, max_images=1)
        runner.hold()
        tasks = [asyncio.create_task(queue.submit(job(seed))) for seed in range(5)]
        await started(runner, 1)
        runner.release()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert runner.batches == [[(seed,)] for seed in range(5)]


def test_a_waiting_batch_starts_after_the_window_with_a_worker_free(runner):
    async def scenario():
        queue = make_queue(runner, workers=2, max_wait_ms=20)
        runner.hold()
        blocked = asyncio.create_task(queue.submit(job(0)))
        await started(runner, 1)
        runner.release(1)  # the first batch stays busy; the next may finish
        lone = await asyncio.wait_for(queue.submit(job(1, size=32)), timeout=5)
        runner.release()
        await blocked
        return lone

    assert asyncio.run(scenario()).seeds == (1,)


def test_a_job_cancelled_while_waiting_leaves_its_batch(runner):
    async def scenario():
        queue = make_queue(runner)
        runner.hold()
        first = asyncio.create_task(queue.submit(job(0)))
        await started(runner, 1)
        kept = asyncio.create_task(queue.submit(job(1)))
        dropped = asyncio.create_task(queue.submit(job(2)))
        await asyncio.sleep(0.01)
        dropped.cancel()
        await asyncio.sleep(0.01)
        runner.release()
        await asyncio.gather(first, kept)
        return queue

    queue = asyncio.run(scenario())
    assert runner.batches == [[(0,)], [(1,)]]
    assert queue.waiting_jobs == 0


def test_a_running_batch_is_stopped_only_when_all_its_jobs_are_cancelled(runner):
    async def scenario():
        queue = make_queue(runner)
        runner.hold()
        blocker = asyncio.create_task(queue.submit(job(0)))
        await started(runner, 1)
        pair = [asyncio.create_task(queue.submit(job(seed))) for seed in (1, 2)]
        await asyncio.sleep(0.01)
        runner.release(0)
        await blocker
        await started(runner, 2)
        pair[0].cancel()
        await asyncio.sleep(0.01)
        one_cancelled = runner.cancel_flags[1].is_set()
        pair[1].cancel()
        await asyncio.sleep(0.01)
        all_cancelled = runner.cancel_flags[1].is_set()
        runner.release()
        await asyncio.gather(*pair, return_exceptions=True)
        return one_cancelled, all_cancelled

    one_cancelled, all_cancelled = asyncio.run(scenario())
    assert (one_cancelled, all_cancelled) == (False, True)


def test_a_failing_batch_fails_only_its_own_jobs(runner):
    jobs = [job(1, prompt="fail"), job(2, prompt="ok"), job(3, size=32)]
    blocker, fail_1, fail_2, other = behind_a_busy_worker(make_queue(runner), runner, jobs)
    assert isinstance(fail_1, ValueError) and isinstance(fail_2, ValueError)
    assert blocker.seeds == (0,) and other.seeds == (3,)


def test_a_job_that_fails_on_its_own_fails_alone_in_its_batch(runner):
    jobs = [job(1, prompt="ok"), job(2, prompt="own failure"), job(3, prompt="ok")]
    blocker, first, failed, last = behind_a_busy_worker(make_queue(runner), runner, jobs)
    assert runner.batches[1] == [(1,), (2,), (3,)]
    assert isinstance(failed, ValueError) and "(2,)" in str(failed)
    assert (blocker.seeds, first.seeds, last.seeds) == ((0,), (1,), (3,))


def test_large_images_batch_within_the_pixel_budget(runner):
    queue = make_queue(runner, max_images=8, max_pixels=2 * 64 * 64)
    jobs = [job(seed, size=64) for seed in range(1, 6)] + [
        job(seed, size=32) for seed in range(6, 14)
    ]
    behind_a_busy_worker(queue, runner, jobs)
    assert queue.capacity(batch_key(job(0, size=64))) == 2
    assert queue.capacity(batch_key(job(0, size=32))) == 8
    assert queue.capacity(batch_key(job(0, size=128))) == 1  # too big for the budget: alone
    large = [batch for batch in runner.batches[1:] if batch[0][0] < 6]
    assert sorted(len(batch) for batch in large) == [1, 2, 2]
    assert [len(batch) for batch in runner.batches[1:] if batch[0][0] >= 6] == [8]


def test_each_queued_job_carries_its_own_sink_and_submit_time(runner):
    """Equal jobs from two requests are two entries, each with its own sink."""

    def first_sink(event) -> None:
        pass

    def second_sink(event) -> None:
        pass

    async def scenario():
        queue = make_queue(runner)
        runner.hold()
        blocker = asyncio.create_task(queue.submit(job(0)))
        await started(runner, 1)
        before = time.perf_counter()
        twins = [
            asyncio.create_task(queue.submit(job(1), sink)) for sink in (first_sink, second_sink)
        ]
        await asyncio.sleep(0.05)
        runner.release()
        await asyncio.gather(blocker, *twins)
        return before

    before = asyncio.run(scenario())
    (alone,), (first, second) = runner.entries
    assert alone.sink is None
    assert first.sink is first_sink and second.sink is second_sink
    assert first.job == second.job
    assert alone.submitted < before <= first.submitted <= second.submitted


def test_a_job_cancelled_while_its_batch_runs_is_marked_abandoned():
    """The batch's run reads the mark to leave the job out of calls it has not started."""
    batches: list[list[QueuedJob]] = []
    releases = [threading.Event(), threading.Event()]

    def run_batch(queued: list[QueuedJob], cancelled: threading.Event):
        batches.append(queued)
        releases[len(batches) - 1].wait(5)
        return [GeneratedImages(images=[], seeds=entry.job.seeds) for entry in queued]

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            settings = BatchingConfig(max_batch_images=4, max_wait_ms=0)
            queue = BatchQueue(run_batch, pool, workers=1, settings=settings)
            blocker = asyncio.ensure_future(queue.submit(job(0)))
            await asyncio.sleep(0.05)  # the blocker runs; the next two wait together
            staying = asyncio.ensure_future(queue.submit(job(1)))
            leaving = asyncio.ensure_future(queue.submit(job(2)))
            await asyncio.sleep(0.05)
            releases[0].set()
            await blocker
            await asyncio.sleep(0.05)  # their batch has started
            leaving.cancel()
            await asyncio.sleep(0.05)
            releases[1].set()
            await staying

    asyncio.run(scenario())
    assert [[entry.job.seeds[0] for entry in batch] for batch in batches] == [[0], [1, 2]]
    assert [entry.abandoned.is_set() for entry in batches[1]] == [False, True]


INK = (("ink", 1.0),)
PAPER = (("paper", 1.0),)


def first_two_started(runner: FakeRunner) -> list[tuple[int, ...]]:
    """With ink job 0 running on one of two workers, a paper job (1) and then an ink job (2)
    wait their window out: which starts second? Both windows end at one dispatch, as the
    test ends them: with a real window, the paper batch's ends first by the time between the
    two submits, and a loaded machine stalled that long (in CI with the suite's two
    processes, past the timer's own lateness), so that it started alone."""

    async def scenario():
        queue = make_queue(runner, workers=2, max_wait_ms=1000)
        runner.hold()
        running = asyncio.create_task(queue.submit(replace(job(0), adapters=INK)))
        await started(runner, 1)
        waiting = [
            asyncio.create_task(queue.submit(replace(job(1), adapters=PAPER))),
            asyncio.create_task(queue.submit(replace(job(2), adapters=INK))),
        ]
        await asyncio.sleep(0.05)  # both wait in their own batch
        assert len(runner.batches) == 1
        queue._max_wait_s = 0.0
        queue._dispatch()  # both windows end now
        await started(runner, 2)
        runner.release()
        await asyncio.gather(running, *waiting)

    asyncio.run(scenario())
    return [batch[0] for batch in runner.batches[:2]]


def test_a_batch_of_the_running_adapter_set_starts_before_an_older_one_of_another(
    runner, monkeypatch
):
    # The paper batch could only wait at the adapter gate, its worker idle, until ink ends;
    # the ink batch runs beside the running one at once. (Overdue only after 5 s here: a
    # machine that stalls the scenario for the default 0.5 s made the paper batch overdue.)
    monkeypatch.setattr(batching, "OVERDUE_S", 5.0)
    assert first_two_started(runner) == [(0,), (2,)]


def test_a_batch_of_another_adapter_set_is_not_passed_over_for_long(runner, monkeypatch):
    monkeypatch.setattr(batching, "OVERDUE_S", 0.0)
    assert first_two_started(runner) == [(0,), (1,)]


async def closed_loop_client(queue: BatchQueue, seeds: list[int]) -> None:
    """A client that asks again as soon as it is answered."""
    for seed in seeds:
        await queue.submit(job(seed))


def test_the_callers_of_a_finished_batch_join_the_waiting_one(runner):
    # Closed-loop clients answered together come back within milliseconds: the waiting
    # batch takes them in rather than starting half full and splitting the clients into
    # two cohorts that take turns at half the batch size.
    async def scenario():
        queue = make_queue(runner, max_wait_ms=1000)
        runner.hold()
        first = asyncio.create_task(closed_loop_client(queue, [0, 5]))
        await started(runner, 1)
        waiting = [asyncio.create_task(queue.submit(job(seed))) for seed in (1, 2, 3, 4)]
        await asyncio.sleep(0.01)
        runner.release()
        await asyncio.wait_for(asyncio.gather(first, *waiting), timeout=0.5)

    asyncio.run(scenario())
    assert runner.batches == [[(0,)], [(1,), (2,), (3,), (4,), (5,)]]


def test_a_lone_client_asking_again_never_waits_for_company(runner):
    async def scenario():
        queue = make_queue(runner, max_wait_ms=1000)
        await asyncio.wait_for(closed_loop_client(queue, list(range(5))), timeout=0.5)

    asyncio.run(scenario())
    assert runner.batches == [[(seed,)] for seed in range(5)]


def test_a_waiting_batch_waits_for_callers_that_do_not_return_at_most_the_window(runner):
    async def scenario():
        queue = make_queue(runner, max_wait_ms=100)
        runner.hold()
        first = asyncio.create_task(queue.submit(job(0)))
        await started(runner, 1)
        waiting = asyncio.create_task(queue.submit(job(1)))
        await asyncio.sleep(0.01)
        runner.release()
        await first
        released = time.monotonic()
        await asyncio.wait_for(waiting, timeout=1)
        return time.monotonic() - released

    waited = asyncio.run(scenario())
    assert 0.05 <= waited < 0.5  # job 0's caller did not come back: job 1 waited ~100 ms


def test_batches_ending_one_after_another_hold_a_waiting_one_one_window_in_all(runner):
    async def scenario():
        queue = make_queue(runner, workers=2, max_wait_ms=1000)
        runner.hold()
        runner.release(2)  # the waiting batch (the third) runs at once when it starts
        first = asyncio.create_task(queue.submit(job(0)))
        await started(runner, 1)
        full = asyncio.create_task(queue.submit(job(10, n=8)))  # full: starts at once
        await started(runner, 2)
        waiting = asyncio.create_task(queue.submit(job(1)))
        await asyncio.sleep(0.01)
        runner.release(0)
        await first
        ended = time.monotonic()
        await asyncio.sleep(0.6)
        runner.release(1)  # a second batch ends inside the first one's window
        await full
        await asyncio.wait_for(waiting, timeout=3)
        return time.monotonic() - ended

    waited = asyncio.run(scenario())
    # One 1 s window from the first end (1.0 s), not a second from the next (1.6 s).
    assert waited < 1.4
