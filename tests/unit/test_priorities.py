"""Priorities and deadlines without a model: a request's class and deadline from its key and
headers, the order the batch queue starts batches in, aging, the replica's rate, and the
deadline test."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from pydantic import ValidationError

from deployments.config.app_config import AppArgs
from deployments.config.model_config import BatchingConfig
from deployments.generator.calls.batching import BatchQueue
from deployments.generator.progress.work_meter import WorkMeter
from deployments.ingress.errors import APIError
from deployments.ingress.priorities import Priorities
from deployments.jobs import DeadlineUnreachable
from deployments.metrics import class_outcome
from deployments.scheduling import deadline_admission
from deployments.scheduling.deadline_admission import ServiceRate, too_late
from deployments.scheduling.job_schedule import JobSchedule
from tests.unit.test_batching import FakeRunner, job, make_queue

HIGH_KEY, LOW_KEY = "key-high", "key-low"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def scheduling_args(**scheduling) -> AppArgs:
    return AppArgs.model_validate(
        {
            "auth": {"api_keys_env": "UNUSED"},
            "request_timeout_s": 100,
            "scheduling": {
                "keys": [
                    {"key_sha256": digest(HIGH_KEY).hex(), "priority": "high"},
                    {
                        "key_sha256": digest(LOW_KEY).hex(),
                        "priority": "low",
                        "header_classes": ["normal"],
                    },
                ],
                **scheduling,
            },
        }
    )


def schedule(rank: int, *, arrived: float, deadline: float = math.inf, aging_s=math.inf):
    return JobSchedule(
        priority_class=("high", "normal", "low")[rank],
        rank=rank,
        arrived=arrived,
        deadline=deadline,
        aging_s=aging_s,
    )


# --- a request's class and deadline (the ingress) ---


def test_a_requests_class_is_its_keys_else_the_default():
    priorities = Priorities(scheduling_args())
    assert priorities.schedule({}, digest(HIGH_KEY)).priority_class == "high"
    assert priorities.schedule({}, digest(LOW_KEY)).rank == 2
    assert priorities.schedule({}, digest("another key")).priority_class == "normal"
    assert priorities.schedule({}, None).priority_class == "normal"


def test_the_header_asks_only_for_classes_the_key_or_everyone_may():
    priorities = Priorities(scheduling_args(header_classes=["low"]))
    # The low key may step up to normal; anyone may step down to low.
    assert priorities.schedule({"x-priority": "normal"}, digest(LOW_KEY)).rank == 1
    assert priorities.schedule({"x-priority": "Low "}, None).priority_class == "low"
    assert priorities.schedule({"x-priority": "high"}, digest(HIGH_KEY)).rank == 0  # its own
    assert priorities.schedule({"x-priority": ""}, digest(LOW_KEY)).rank == 2  # asks nothing
    for headers, key, code in [
        ({"x-priority": "high"}, digest(LOW_KEY), "priority_not_allowed"),
        ({"x-priority": "high"}, None, "priority_not_allowed"),
        ({"x-priority": "urgent"}, None, "invalid_priority"),
    ]:
        with pytest.raises(APIError) as refused:
            priorities.schedule(headers, key)
        assert (refused.value.status_code, refused.value.param) == (400, "x-priority")
        assert refused.value.code == code


def test_the_deadline_is_the_timeout_or_the_clients_shorter_one():
    priorities = Priorities(scheduling_args())
    assert priorities.schedule({}, None, arrived=1000.0).deadline == 1100.0
    assert priorities.schedule({"x-request-timeout": "2.5"}, None, arrived=1000.0).deadline == (
        1002.5
    )
    # Longer than the service waits: the service's timeout stands.
    assert priorities.schedule({"x-request-timeout": "500"}, None, arrived=0.0).deadline == 100
    # Infinite, or empty: the service's timeout stands.
    assert priorities.schedule({"x-request-timeout": "inf"}, None, arrived=0.0).deadline == 100
    assert priorities.schedule({"x-request-timeout": " "}, None, arrived=0.0).deadline == 100
    for bad in ("0", "-1", "soon", "nan", "-inf"):
        with pytest.raises(APIError) as refused:
            priorities.schedule({"x-request-timeout": bad}, None)
        assert refused.value.param == "x-request-timeout"


def test_the_config_names_only_its_classes_and_keys_need_auth():
    for scheduling in [
        {"default_class": "urgent"},
        {"header_classes": ["urgent"]},
        {"classes": ["a", "a"]},
        {"classes": ["Not A Name"]},
        {"classes": []},
        {"keys": [{"key_sha256": "0" * 64, "priority": "urgent"}]},
        {"keys": [{"key_sha256": "0" * 64}, {"key_sha256": "0" * 64}]},
        {"aging_s": 0},
    ]:
        with pytest.raises(ValidationError):
            AppArgs.model_validate({"auth": {"api_keys_env": "K"}, "scheduling": scheduling})
    with pytest.raises(ValidationError, match=r"scheduling\.keys needs API keys"):
        AppArgs.model_validate({"scheduling": {"keys": [{"key_sha256": "0" * 64}]}})
    assert AppArgs().scheduling.default_class == "normal"


# --- the order waiting work starts in ---


def test_urgency_is_class_then_deadline_then_arrival_and_aging_lifts_the_class():
    now = 1000.0
    high = schedule(0, arrived=now, deadline=now + 50)
    low = schedule(2, arrived=now, deadline=now + 10)
    assert high.urgency(now) < low.urgency(now)
    assert schedule(1, arrived=now, deadline=now + 5).urgency(now) < schedule(
        1, arrived=now - 1, deadline=now + 6
    ).urgency(now)
    aging = schedule(2, arrived=now - 25, deadline=now + 75, aging_s=10)
    assert aging.effective_rank(now) == 0  # two classes up after 20 s
    assert schedule(2, arrived=now - 15, aging_s=10).effective_rank(now) == 1
    # Aged to the top, its earlier deadline puts it before a newer high-class job.
    assert aging.urgency(now) < schedule(0, arrived=now, deadline=now + 100).urgency(now)


def scheduled_job(seed: int, rank: int, *, waited: float = 0.0, timeout: float = 100.0, **kw):
    now = time.time()
    return replace(
        job(seed, **kw),
        schedule=schedule(rank, arrived=now - waited, deadline=now - waited + timeout, aging_s=10),
    )


def run_behind_a_busy_worker(runner: FakeRunner, jobs, **queue_settings):
    """Hold one job on the only worker, submit `jobs` one by one, then let all run; the
    order the batches ran in (by their first seed)."""

    async def scenario():
        queue = make_queue(runner, **queue_settings)
        runner.hold()
        blocker = asyncio.create_task(queue.submit(job(0)))
        while not runner.batches:
            await asyncio.sleep(0.001)
        tasks = []
        for waiting in jobs:
            tasks.append(asyncio.create_task(queue.submit(waiting)))
            await asyncio.sleep(0.002)  # arrival order is submission order
        runner.release()
        await asyncio.gather(blocker, *tasks)

    asyncio.run(scenario())
    return [batch[0][0] for batch in runner.batches[1:]]


def test_the_batch_queue_starts_the_higher_class_first_then_the_earlier_deadline():
    jobs = [
        scheduled_job(1, 2),
        scheduled_job(2, 2, timeout=50),
        scheduled_job(3, 1),
        scheduled_job(4, 0),
        scheduled_job(5, 0, timeout=20),
    ]
    assert run_behind_a_busy_worker(FakeRunner(), jobs, max_images=1) == [5, 4, 3, 2, 1]


def test_a_low_class_job_that_waited_long_enough_goes_before_new_high_class_ones():
    jobs = [scheduled_job(1, 0), scheduled_job(2, 2, waited=21), scheduled_job(3, 0)]
    assert run_behind_a_busy_worker(FakeRunner(), jobs, max_images=1) == [2, 1, 3]


def test_a_batch_is_as_urgent_as_its_most_urgent_job():
    # A low job opens a batch, a high one of another size opens another, and a high one
    # joins the low job's batch: that batch goes first (earlier deadline at equal class).
    jobs = [
        scheduled_job(1, 2, size=32),
        scheduled_job(2, 0, size=64, timeout=60),
        scheduled_job(3, 0, size=32, timeout=50),
    ]
    assert run_behind_a_busy_worker(FakeRunner(), jobs) == [1, 2]


def test_unscheduled_jobs_keep_the_old_order_full_batches_first():
    jobs = [job(1, size=32), job(2, size=64), job(3, size=64)]
    assert run_behind_a_busy_worker(FakeRunner(), jobs, max_images=2) == [2, 1]


# --- the replica's rate and the deadline test ---


def test_the_rate_counts_busy_time_only_and_is_the_median_of_recent_windows(monkeypatch):
    monkeypatch.setattr(deadline_admission, "MIN_WINDOW_S", 1.0)
    rate = ServiceRate()
    assert rate.recent() is None
    rate.busy(True, 0.0)
    rate.done(100.0, 0.5)
    rate.done(100.0, 1.0)  # 200 in 1 s: a window
    assert rate.recent() == pytest.approx(200.0)
    rate.busy(False, 1.0)
    rate.busy(True, 50.0)  # 49 idle seconds do not count
    rate.done(50.0, 51.0)
    rate.done(300.0, 52.0)
    assert rate.recent() == pytest.approx(200.0)  # the median of 200, 50, 300
    for second in range(53, 60):  # the windows of a slower load replace the old ones
        rate.done(20.0, float(second))
    assert rate.recent() == pytest.approx(20.0)


def test_too_late_when_the_work_ahead_and_its_own_end_after_the_deadline():
    now = 1000.0
    job_schedule = replace(schedule(1, arrived=now, deadline=now + 10), refuse_late=True)
    assert too_late(job_schedule, own_work=100, ahead_work=800, rate=100, now=now) is None
    late = too_late(job_schedule, own_work=100, ahead_work=1400, rate=100, now=now)
    assert late is not None
    assert (late.finish_s, late.remaining_s, late.retry_after_s) == (15.0, 10.0, 5)
    # No rate yet, no deadline, or refusals off: never refused.
    assert too_late(job_schedule, own_work=100, ahead_work=1e9, rate=None, now=now) is None
    assert too_late(replace(job_schedule, refuse_late=False), 100, 1e9, 100, now) is None
    unbounded = replace(job_schedule, deadline=math.inf)
    assert too_late(unbounded, own_work=100, ahead_work=1e9, rate=100, now=now) is None
    assert too_late(job_schedule, 1e9, 0, 1, now).retry_after_s == 60  # capped


def test_the_work_ahead_is_the_held_work_of_its_class_and_higher_and_what_started():
    meter = WorkMeter()

    class Held:
        def __init__(self, rank: int, steps: int = 1) -> None:
            self.job = scheduled_job(rank, rank, steps=steps, size=10)

    class Step:  # a call's part: the held job's images in one step
        def __init__(self, held: Held) -> None:
            self.queued, self.job = held, held.job

    high, normal, low = Held(0), Held(1), Held(2, steps=3)
    with meter.holding(high), meter.holding(normal), meter.holding(low):
        assert meter.ahead_of(0) == 100
        assert meter.ahead_of(1) == 200
        assert meter.ahead_of(2) == 500
        meter.step_done([Step(normal)], in_loop=True)
        # In a loop that preempts lower classes, a started job of a lower class is not ahead.
        assert meter.ahead_of(0, preempting=True) == 100
        assert meter.images_in_flight(0, preempting=True) == 0
        assert meter.ahead_of(0) == 100  # its one step is done: nothing left
        meter.step_done([Step(low)])
        # A started call: its 2 steps left are ahead of every class, preempting or not.
        assert meter.ahead_of(0) == meter.ahead_of(0, preempting=True) == 300
        assert meter.ahead_of(1) == 300  # the normal job is done (0 left)
        # What a starting job's steps share the rate with: the images in flight beside it.
        assert meter.images_in_flight(0) == 2
        assert meter.images_in_flight(0, preempting=True) == 1
    assert meter.ahead_of(2) == 0


def test_the_per_class_outcome_tells_refusals_and_timeouts_from_other_errors():
    assert class_outcome({"status": 200, "outcome": "ok"}) == "ok"
    refused = {"status": 503, "outcome": "error", "error_code": "deadline_unreachable"}
    assert class_outcome(refused) == "refused_late"
    assert class_outcome({"status": 504, "outcome": "error", "error_code": "timeout"}) == (
        "timed_out"
    )
    assert class_outcome({"status": 503, "outcome": "error"}) == "error"
    assert class_outcome({"status": 499, "outcome": "cancelled"}) == "cancelled"


def test_a_late_job_cancelled_as_its_batch_starts_leaves_the_others_running():
    """The race an audit found: a cancelled job's answer is settled at once, its withdrawal
    a loop turn later; a batch starting between must not trip over it."""
    runner = FakeRunner()

    def late(waiting) -> Exception | None:
        return DeadlineUnreachable(1.0, 1) if waiting.seeds == (2,) else None

    async def scenario():
        settings = BatchingConfig(max_batch_images=8, max_wait_ms=1000)
        queue = BatchQueue(runner, ThreadPoolExecutor(2), workers=2, settings=settings, late=late)
        runner.hold()
        blocker = asyncio.create_task(queue.submit(job(0, size=32)))
        while not runner.batches:
            await asyncio.sleep(0.001)
        kept = asyncio.create_task(queue.submit(job(1)))
        doomed = asyncio.create_task(queue.submit(job(2)))
        await asyncio.sleep(0.01)  # both wait in one batch (its window is 1 s)
        doomed.cancel()
        queue._max_wait_s = 0.0
        queue._dispatch()  # the batch starts before the cancelled job withdraws
        runner.release()
        return await asyncio.gather(blocker, kept, doomed, return_exceptions=True)

    blocker, kept, doomed = asyncio.run(scenario())
    assert kept.seeds == (1,) and blocker.seeds == (0,)
    assert isinstance(doomed, asyncio.CancelledError)
