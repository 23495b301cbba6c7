"""How the ingress answers the generator's failures, as Ray hands them over (a replica's
exception arrives as a `RayTaskError` that is also an instance of the original class)."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from deployments.ingress.deployment import generator_errors_as_api_errors
from deployments.ingress.errors import APIError
from deployments.jobs import (
    AdapterUnavailable,
    DeadlineUnreachable,
    GenerationOutOfMemory,
    ReplicaBroken,
)


def answer_to(error: BaseException) -> APIError:
    with pytest.raises(APIError) as raised, generator_errors_as_api_errors("req-1"):
        raise error
    return raised.value


def test_out_of_memory_on_the_replica_is_a_retryable_503():
    wrapped = RayTaskError("generate", "traceback", GenerationOutOfMemory("1 image"))
    answer = answer_to(wrapped.as_instanceof_cause())
    assert (answer.status_code, answer.code, answer.retryable) == (503, "service_unavailable", True)
    assert answer.retry_after_s == 2
    assert "traceback" not in answer.message and "1 image" not in answer.message


def test_a_broken_device_on_the_replica_is_a_retryable_503():
    wrapped = RayTaskError("generate", "traceback", ReplicaBroken("the device failed"))
    answer = answer_to(wrapped.as_instanceof_cause())
    assert (answer.status_code, answer.retryable) == (503, True)


def test_a_full_queue_is_a_retryable_503():
    answer = answer_to(BackPressureError(num_queued_requests=5, max_queued_requests=5))
    assert (answer.status_code, answer.retryable, answer.retry_after_s) == (503, True, 2)


def test_any_other_failure_is_left_to_the_500_handler():
    with pytest.raises(ValueError), generator_errors_as_api_errors("req-1"):
        raise ValueError("boom")


def test_an_adapter_that_cannot_load_is_a_400_naming_it_and_not_retryable():
    unavailable = AdapterUnavailable("ink", "its weights do not fit the model")
    wrapped = RayTaskError("generate", "traceback", unavailable)
    answer = answer_to(wrapped.as_instanceof_cause())
    assert (answer.status_code, answer.code) == (400, "adapter_unavailable")
    assert not answer.retryable
    assert "'ink'" in answer.message and "do not fit" in answer.message
    assert "traceback" not in answer.message


@pytest.mark.parametrize("cancelled", [TaskCancelledError(), RequestCancelledError("req-1")])
def test_a_cancelled_generator_call_is_the_client_leaving_not_a_server_error(cancelled):
    """A client that leaves mid-stream cancels its generator call; Ray may raise that call's
    cancellation in the ingress before the ingress's own task is cancelled. It must end as a
    cancellation (the request's 499), never reach the 500 handler."""
    with pytest.raises(asyncio.CancelledError), generator_errors_as_api_errors("req-1"):
        raise cancelled


def test_a_job_refused_for_its_deadline_is_a_retryable_503_with_the_replicas_retry_after():
    wrapped = RayTaskError("generate", "traceback", DeadlineUnreachable(12.5, 13))
    answer = answer_to(wrapped.as_instanceof_cause())
    assert (answer.status_code, answer.code, answer.retryable) == (
        503,
        "deadline_unreachable",
        True,
    )
    assert answer.retry_after_s == 13
    assert "traceback" not in answer.message
