"""How a batch runs as pipeline calls: chunks of a large job, smaller calls after a failure,
and each job's result put back together (no pipeline; see tests/pipeline/test_isolation.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.generator.calls.batching import QueuedJob
from deployments.generator.calls.call_plan import BatchRun, is_out_of_memory, plan_calls, split_call
from deployments.generator.calls.call_runner import is_device_failure
from deployments.generator.calls.call_timing import CallTimes
from deployments.jobs import GeneratedImages, GenerationJob, GenerationOutOfMemory


def queued(seed: int, n: int = 1, request_id: str = "") -> QueuedJob:
    job = GenerationJob(
        prompt="p",
        negative_prompt=None,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=7.0,
        seeds=tuple(range(seed, seed + n)),
        request_id=request_id,
    )
    return QueuedJob(job=job, sink=None, submitted=1.0)


def shape(calls) -> list[list[tuple[int, tuple[int, ...]]]]:
    """Each call as (job index, seeds) per part."""
    return [[(part.index, part.job.seeds) for part in call] for call in calls]


def times(started: float, generate_s: float = 1.0) -> CallTimes:
    return CallTimes(started, generate_s, text_encode_s=0.1, denoise_s=0.5, decode_s=0.4, steps=2)


def image(value: int) -> np.ndarray:
    return np.full((1, 1, 3), value, np.uint8)


def test_a_batch_that_fits_is_one_call_of_whole_jobs():
    batch = [queued(10, n=2), queued(20), queued(30, n=3)]
    assert shape(plan_calls(batch, capacity=6)) == [[(0, (10, 11)), (1, (20,)), (2, (30, 31, 32))]]


def test_a_job_too_large_for_one_call_runs_in_chunks_of_its_seeds():
    calls = plan_calls([queued(0, n=10)], capacity=3)
    assert shape(calls) == [[(0, (0, 1, 2))], [(0, (3, 4, 5))], [(0, (6, 7, 8))], [(0, (9,))]]
    assert [call[0].first for call in calls] == [0, 3, 6, 9]


def test_a_failed_call_of_several_jobs_runs_again_one_job_a_call():
    (call,) = plan_calls([queued(0, n=2), queued(5), queued(7)], capacity=8)
    for out_of_memory in (False, True):
        assert shape(split_call(call, out_of_memory)) == [[(0, (0, 1))], [(1, (5,))], [(2, (7,))]]


def test_a_failed_call_of_one_job_splits_only_when_out_of_memory():
    (call,) = plan_calls([queued(0, n=5)], capacity=8)
    assert split_call(call, out_of_memory=False) == []
    halves = split_call(call, out_of_memory=True)
    assert shape(halves) == [[(0, (0, 1, 2))], [(0, (3, 4))]]
    assert [half[0].first for half in halves] == [0, 3]
    (single,) = split_call(halves[1], out_of_memory=True)[1]
    assert (single.first, single.job.seeds) == (4, (4,))
    assert split_call([single], out_of_memory=True) == []


def test_a_job_in_several_calls_gets_its_images_in_seed_order_with_their_account():
    run = BatchRun([queued(0, n=4)], capacity=2, started=3.0)
    first, second = run.planned_calls()
    run.succeeded(second, [image(2), image(3)], times(started=5.0))  # out of order on purpose
    run.succeeded(first, [image(0), image(1)], times(started=3.0))
    (result,) = run.results()
    assert isinstance(result, GeneratedImages)
    assert [int(i[0, 0, 0]) for i in result.images] == [0, 1, 2, 3]
    assert result.seeds == (0, 1, 2, 3)
    assert result.batch_images == 2
    assert result.queue_s == pytest.approx(2.0)  # submitted at 1.0, batch started at 3.0
    assert result.generate_s == pytest.approx(3.0)  # from 3.0 to the end of the last call
    assert result.denoise_s == pytest.approx(1.0)  # both calls' denoising


def test_a_job_that_fails_alone_fails_with_its_own_exception_and_runs_no_further():
    run = BatchRun([queued(0, request_id="bad"), queued(1, request_id="good")], 8, started=1.0)
    (call,) = run.planned_calls()
    error = TypeError("TextEncodeInput must be ...")
    retries = run.failed(call, error)
    assert shape(retries) == [[(0, (0,))], [(1, (1,))]]
    assert run.failed(retries[0], error) == []
    assert run.unfailed(call) == [call[1]]
    run.succeeded(retries[1], [image(9)], times(started=2.0))
    bad, good = run.results()
    assert bad is error
    assert isinstance(good, GeneratedImages) and good.batch_images == 1


def test_a_job_whose_caller_has_gone_is_not_run_again_after_a_split():
    gone, staying = queued(0, request_id="gone"), queued(1, request_id="staying")
    run = BatchRun([gone, staying], 8, started=1.0)
    (call,) = run.planned_calls()
    retries = run.failed(call, TypeError("one bad prompt"))
    gone.abandoned.set()  # its client left while the batch ran
    assert [run.unfailed(retry) for retry in retries] == [[], [retries[1][0]]]
    run.succeeded(retries[1], [image(9)], times(started=2.0))
    left, served = run.results()
    assert isinstance(left, Exception) and isinstance(served, GeneratedImages)


def test_a_single_image_out_of_memory_fails_its_job_with_a_shared_exception():
    run = BatchRun([queued(0)], capacity=1, started=1.0)
    (call,) = run.planned_calls()
    assert run.failed(call, torch.OutOfMemoryError("CUDA out of memory. Tried ...")) == []
    (result,) = run.results()
    assert isinstance(result, GenerationOutOfMemory)
    assert "64x64" in str(result)


def test_the_split_is_logged_with_the_request_ids(caplog):
    run = BatchRun([queued(0, request_id="req-a"), queued(1, request_id="req-b")], 8, 1.0)
    with caplog.at_level("WARNING", logger="ray.serve"):
        run.failed(run.planned_calls()[0], ValueError("bad prompt"))
    assert "req-a" in caplog.text and "req-b" in caplog.text and "bad prompt" in caplog.text


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        torch.cuda.OutOfMemoryError("CUDA out of memory."),
        RuntimeError("MPS backend out of memory"),
        torch.AcceleratorError("CUDA error: out of memory"),
    ],
)
def test_out_of_memory_is_recognised_and_is_no_device_failure(error):
    assert is_out_of_memory(error)
    assert not is_device_failure(error)


def test_other_failures_are_not_out_of_memory():
    assert not is_out_of_memory(ValueError("out of memory"))  # not torch's
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access"))
    assert is_device_failure(RuntimeError("CUDA error: an illegal memory access"))
