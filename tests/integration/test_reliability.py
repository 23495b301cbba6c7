"""Reliability on real Ray Serve: overload, timeouts, client disconnects, a killed replica, a
device error and a redeploy, each with the figures it measured (printed; `pytest -s` shows
them).

Three applications: `/overload` with a deliberately tiny queue, `/slow` with one worker thread
and no batching, where a request of many steps holds the replica for seconds, and `/faulty`,
whose generator can be told to fail on the device.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import httpx
import psutil
import pytest
from ray import serve
from ray.serve import Application

from deployments.config.app_config import AppArgs
from deployments.config.model_config import generator_deployment_name
from deployments.generator.deployment import ImageGenerator
from deployments.ingress.deployment import ImageIngress
from serve_app import build_application, parse_args

from .helpers import one_at_a_time

pytestmark = pytest.mark.integration

GENERATIONS = "/v1/images/generations"
SLOW_ARGS = one_at_a_time(request_timeout_s=5)
SLOW_OPTIONS = {
    "max_ongoing_requests": 8,
    "max_queued_requests": 8,
    "graceful_shutdown_timeout_s": 30,
    "graceful_shutdown_wait_loop_s": 0.5,
    "ray_actor_options": {"num_cpus": 1},
}
# 90 s and 20,000 steps: the redeploy test holds a generation of over 20 s through a
# redeploy, which at 5,000 steps (the default cap) a fast minute of this machine runs in 22 s.
OVERLOAD_ARGS = one_at_a_time(request_timeout_s=90, max_steps=20_000)
# Two requests in the replica and two waiting for it: the service holds four at once.
OVERLOAD_OPTIONS = {
    "max_ongoing_requests": 2,
    "max_queued_requests": 2,
    "ray_actor_options": {"num_cpus": 1},
}


def report(name: str, **figures) -> None:
    print(f"\n[reliability] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def assert_error_shape(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


class Deployed:
    """An application of this module: its base URL and its generator's handle."""

    def __init__(
        self, serve_url: str, name: str, args: dict, options: dict, build=build_application
    ) -> None:
        self.name = name
        self.url = f"{serve_url}/{name}"
        serve.run(build(parse_args(args), options), name=name, route_prefix=f"/{name}")
        self.generator_name = generator_deployment_name("tiny-sd3")
        self.generator = serve.get_deployment_handle(self.generator_name, app_name=name)

    def post(self, timeout: float | httpx.Timeout = 60, **body) -> httpx.Response:
        return httpx.post(self.url + GENERATIONS, json={"prompt": "x", **body}, timeout=timeout)

    def counters(self) -> dict[str, int]:
        return self.generator.counters.remote().result(timeout_s=30)

    def steps_run(self) -> int:
        return self.counters()["steps_run"]


@pytest.fixture(scope="module")
def slow(serve_url):
    app = Deployed(serve_url, "slow", SLOW_ARGS, SLOW_OPTIONS)
    yield app
    serve.delete(app.name)


@pytest.fixture(scope="module")
def step_s(slow) -> float:
    """Seconds per denoising step of a 32x32 image on this machine."""
    slow.post(num_inference_steps=2)  # warm-up
    started = time.perf_counter()
    assert slow.post(num_inference_steps=100).status_code == 200
    per_step = (time.perf_counter() - started) / 100
    report("calibration", seconds_per_step=round(per_step, 4))
    return per_step


def steps_for(seconds: float, step_s: float, most: int = 5000) -> int:
    return min(most, max(10, int(seconds / step_s)))


def wait_until_steady(app: Deployed, settle_s: float = 1.0) -> int:
    """The replica's step count once it has stopped changing for `settle_s`."""
    last = app.steps_run()
    while True:
        time.sleep(settle_s)
        now = app.steps_run()
        if now == last:
            return now
        last = now


def test_client_disconnect_stops_its_generation_and_frees_its_slot(slow, step_s):
    long_steps = steps_for(30, step_s)
    before = wait_until_steady(slow)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # The client gives up after 1.5 s, long before its 30 s of steps are done.
        def impatient():
            with pytest.raises(httpx.ReadTimeout):
                slow.post(timeout=httpx.Timeout(30, read=1.5), num_inference_steps=long_steps)
            return time.monotonic(), slow.steps_run()

        gone = pool.submit(impatient)
        time.sleep(0.5)
        # One worker thread: this request waits behind the long one until it stops.
        waiting = slow.post(num_inference_steps=3)
        answered_at = time.monotonic()
        disconnected_at, steps_at_disconnect = gone.result()

    assert waiting.status_code == 200
    after = wait_until_steady(slow)
    steps_after_disconnect = after - steps_at_disconnect - 3  # the waiting request's 3
    report(
        "client disconnect",
        steps_before_disconnect=steps_at_disconnect - before,
        steps_after_disconnect=steps_after_disconnect,
        of_steps=long_steps,
        waiting_request_answered_s_after_disconnect=round(answered_at - disconnected_at, 3),
    )
    assert steps_at_disconnect - before > 0, "the long generation had started"
    # The step under way when the cancellation reaches the replica still ends (the step
    # callback stops the next); the count read after the disconnect may also miss a step
    # that ended while the cancellation travelled. So at most two steps run after it.
    assert steps_after_disconnect <= 2
    assert answered_at - disconnected_at < 5


def test_closing_a_stream_stops_its_generation(slow, step_s):
    long_steps = steps_for(30, step_s)
    before = wait_until_steady(slow)
    body = {"prompt": "x", "stream": True, "stream_progress": True}
    body["num_inference_steps"] = long_steps
    progress = 0
    with httpx.stream("POST", slow.url + GENERATIONS, json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            progress += line == "event: image_generation.progress"
            if progress == 3:
                break  # leaving the block closes the connection
    steps_at_close = slow.steps_run()
    after = wait_until_steady(slow)
    report(
        "stream closed",
        steps_before_close=steps_at_close - before,
        steps_after_close=after - steps_at_close,
        of_steps=long_steps,
    )
    assert steps_at_close - before > 0, "the generation had started"
    assert after - steps_at_close <= 2


def test_request_over_the_timeout_gets_504_and_its_generation_stops(slow, step_s):
    # Far past the 5 s timeout even if the machine runs several times faster than when
    # `step_s` was measured (a busy minute then; CI once saw a "30 s" request end in 5 s).
    long_steps = steps_for(120, step_s)
    before = wait_until_steady(slow)
    started = time.monotonic()
    response = slow.post(num_inference_steps=long_steps)
    elapsed = time.monotonic() - started
    at_answer = slow.steps_run()
    after = wait_until_steady(slow)

    assert response.status_code == 504
    error = assert_error_shape(response)
    assert error["code"] == "timeout"
    report(
        "timeout",
        timeout_s=SLOW_ARGS["request_timeout_s"],
        answered_after_s=round(elapsed, 2),
        steps_run=after - before,
        steps_after_answer=after - at_answer,
        of_steps=long_steps,
    )
    assert SLOW_ARGS["request_timeout_s"] <= elapsed < SLOW_ARGS["request_timeout_s"] + 3
    assert after - at_answer <= 2
    assert after - before < long_steps


def assert_full_queue_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert assert_error_shape(response)["code"] == "service_unavailable"
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-should-retry"] == "true"


def timed_post(app: Deployed, **body) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = app.post(**body)
    return response, time.monotonic() - started


@pytest.fixture(scope="module")
def overload(serve_url, step_s):
    app = Deployed(serve_url, "overload", OVERLOAD_ARGS, OVERLOAD_OPTIONS)
    app.post()  # warm-up
    # The ingress's router learns the generator's queue limit from Serve's controller
    # asynchronously, after its first request; until then it rejects nothing.
    time.sleep(2)
    yield app
    serve.delete(app.name)


CAPACITY = OVERLOAD_OPTIONS["max_ongoing_requests"] + OVERLOAD_OPTIONS["max_queued_requests"]


def test_past_the_queue_requests_get_503_at_once(overload, step_s):
    """Past the queue a request is rejected at once.

    Ray's router counts queued requests asynchronously: of requests arriving at the same
    instant it may reject one that would have fit (its own comments say so). While the four
    filling requests were sent at once, this test failed in 4 of 8 full-suite runs (in one,
    a filling request was seen rejected and an extra served in its place), so they are sent
    a little apart. Should one extra still slip into the queue, it must be served; every
    other extra must be a 503, at once.
    """
    # Fill the service with requests of about 8 s each, then send three times as many more.
    # (The calibration can be off by a few times when other work shared the cores then; the
    # admitted requests must outlast the burst of extras even so.)
    long_steps = steps_for(8, step_s)
    with concurrent.futures.ThreadPoolExecutor(4 * CAPACITY) as pool:
        admitted = []
        for _ in range(CAPACITY):
            admitted.append(pool.submit(timed_post, overload, num_inference_steps=long_steps))
            time.sleep(0.25)
        extra = [pool.submit(timed_post, overload) for _ in range(3 * CAPACITY)]
        answered, slipped = concurrent.futures.wait(extra, timeout=3)
        rejected = [future.result() for future in answered]
        assert len(slipped) <= 1, (len(slipped), step_s, long_steps)
        # One client, one connection, one request at a time: the service's own answer time,
        # without 12 clients starting at once on the same two cores.
        probes = []
        with httpx.Client(timeout=30) as probe:
            for _ in range(5):
                started = time.monotonic()
                response = probe.post(overload.url + GENERATIONS, json={"prompt": "probe"})
                probes.append(time.monotonic() - started)
                assert_full_queue_503(response)
        served = [future.result() for future in admitted]
        served_late = [future.result() for future in slipped]

    for response, _ in rejected:
        assert_full_queue_503(response)
    assert [response.status_code for response, _ in served + served_late] == [200] * (
        CAPACITY + len(slipped)
    )
    rejection_s = sorted(seconds for _, seconds in rejected)
    report(
        "full queue",
        admitted=CAPACITY,
        rejected_503=len(rejected),
        slipped_into_the_queue=len(slipped),
        median_503_s=round(rejection_s[len(rejection_s) // 2], 3),
        slowest_503_s=round(rejection_s[-1], 3),
        probe_503_s=round(sorted(probes)[2], 3),
        slowest_admitted_s=round(max(seconds for _, seconds in served), 2),
    )
    # At once: long before any admitted request ends (a request that waited for a slot
    # would take at least as long as one of them). Relative, not in seconds: on a loaded
    # 2-core machine 12 clients starting together took 1.4 s for their 503s (the admitted
    # ones, calibrated to 8 s, took tens of seconds).
    shortest_admitted_s = min(seconds for _, seconds in served)
    assert rejection_s[-1] < shortest_admitted_s / 4
    assert max(probes) < shortest_admitted_s / 10


def test_sustained_4x_overload_nothing_hangs_memory_stays_flat(overload):
    clients = 4 * CAPACITY
    replica = psutil.Process(overload.counters()["pid"])
    rss_before = rss_peak = replica.memory_info().rss
    outcomes: list[tuple[httpx.Response, float]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 8

    def client() -> None:  # closed loop, ignoring retry-after: the worst case
        while time.monotonic() < stop_at:
            outcome = timed_post(overload, num_inference_steps=8)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        rss_peak = max(rss_peak, replica.memory_info().rss)
        time.sleep(0.1)

    ok = [seconds for response, seconds in outcomes if response.status_code == 200]
    for response, _ in outcomes:
        if response.status_code != 200:
            assert_full_queue_503(response)
    slowest = max(seconds for _, seconds in outcomes)
    report(
        "sustained overload",
        clients=clients,
        capacity=CAPACITY,
        seconds=8,
        succeeded=len(ok),
        rejected_503=len(outcomes) - len(ok),
        slowest_answer_s=round(slowest, 2),
        replica_rss_growth_mib=round((rss_peak - rss_before) / 2**20, 1),
    )
    assert ok
    assert slowest < OVERLOAD_ARGS["request_timeout_s"]
    # Measured +1 to +7 MiB over runs; a leak of one 32x32 request's buffers per rejection
    # would pass 200 MiB, so the bound is near what was measured.
    assert rss_peak - rss_before < 24 * 2**20
    # Once the load is gone, the service answers normally.
    assert [overload.post().status_code for _ in range(3)] == [200] * 3


def test_killed_replica_is_replaced_and_its_requests_fail_retryable(slow, step_s):
    old_pid = slow.counters()["pid"]
    in_flight_steps = steps_for(6, step_s)  # each still running when the kill lands at 1 s
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        in_flight = [pool.submit(slow.post, num_inference_steps=in_flight_steps) for _ in range(3)]
        time.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        failed = [future.result() for future in in_flight]
    failed_within = time.monotonic() - killed_at

    for response in failed:
        assert response.status_code == 503, response.text
        assert response.headers["x-should-retry"] == "true"
        assert assert_error_shape(response)["code"] == "service_unavailable"

    # Until the new replica is up, requests wait for it (or time out in the API's shape).
    while True:
        response = slow.post(num_inference_steps=2)
        if response.status_code == 200:
            break
        assert response.status_code in (503, 504)
        assert_error_shape(response)
        assert time.monotonic() - killed_at < 120, "no replacement replica"
        time.sleep(0.2)
    recovered_s = time.monotonic() - killed_at
    assert slow.counters()["pid"] != old_pid
    report(
        "replica killed",
        in_flight_failed_503=len(failed),
        failed_within_s=round(failed_within, 2),
        recovered_s=round(recovered_s, 1),
    )


def test_redeploy_lets_in_flight_requests_finish(overload, step_s):
    """A generation longer than Serve's default graceful shutdown (20 s) survives a redeploy:
    the generator's own `graceful_shutdown_timeout_s` (300 s) is what lets it finish."""
    old_pid = overload.counters()["pid"]
    # A change of the model's args (its default steps) makes a new generator version, and a
    # change of the ingress's (storage) a new ingress version: both sides are replaced.
    model = {**OVERLOAD_ARGS["models"][0], "default_steps": 3}
    changed = {**OVERLOAD_ARGS, "models": [model], "storage": {"ttl_s": 1800}}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # 40 s by the calibration, which counts a request's fixed costs as steps: a long
        # request ran at 0.84 of its estimate (19 s after the redeploy for 24 s asked, CI on
        # 2026-12-03), and the machine's speed drifts by a third. 40 s keeps it past 20 s
        # and under the 90 s timeouts either way.
        steps = steps_for(40, step_s, most=OVERLOAD_ARGS["limits"]["max_steps"])
        assert steps < OVERLOAD_ARGS["limits"]["max_steps"], "capped: the machine is too fast"
        in_flight = pool.submit(overload.post, timeout=90, num_inference_steps=steps)
        time.sleep(1.0)
        started = time.monotonic()
        serve.run(
            build_application(parse_args(changed), OVERLOAD_OPTIONS),
            name=overload.name,
            route_prefix=f"/{overload.name}",
        )
        redeployed_s = time.monotonic() - started
        response = in_flight.result()
        finished_s = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert finished_s > 20, "the generation outlasted Serve's default graceful timeout"
    assert overload.post(num_inference_steps=2).status_code == 200
    assert overload.counters()["pid"] != old_pid, "the redeploy replaced the replica"
    report(
        "redeploy",
        in_flight_status=response.status_code,
        in_flight_finished_s_after_redeploy=round(finished_s, 1),
        redeploy_s=round(redeployed_s, 1),
    )


# One request at a time, and Serve's health check every second rather than every 10 s.
FAULTY_ARGS = one_at_a_time(request_timeout_s=30)
FAULTY_OPTIONS = {**SLOW_OPTIONS, "health_check_period_s": 1}


def with_fault_injection(args: AppArgs, options: dict) -> Application:
    """The service as `build_application` makes it, its generator's class with one method
    more, `break_device`, for this test only. The class is made in a function so that it
    travels to the replicas by value: they need not import the tests."""

    class FaultInjectingGenerator(ImageGenerator.func_or_class):
        def break_device(self) -> None:
            """From now on the denoiser fails as a CUDA device does after a fault, inside
            every generation (the engine's own check tells device errors from others)."""

            def broken(*args, **kwargs):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

            self._engine._pipelines.shared.transformer.forward = broken

    model = args.models[0]
    generator = ImageGenerator.options(
        func_or_class=FaultInjectingGenerator,
        name=generator_deployment_name(model.id),
        **{**model.deployment, **options},
    ).bind(model, *args.engine_settings(model))
    return ImageIngress.bind(args, {model.id: generator})


@pytest.fixture(scope="module")
def faulty(serve_url):
    app = Deployed(serve_url, "faulty", FAULTY_ARGS, FAULTY_OPTIONS, build=with_fault_injection)
    yield app
    serve.delete(app.name)


def generator_status(app: Deployed) -> str:
    deployments = serve.status().applications[app.name].deployments
    return deployments[app.generator_name].status  # a str enum: "HEALTHY", "UNHEALTHY", ...


def test_a_device_error_in_a_generation_fails_it_retryable_and_serve_replaces_the_replica(faulty):
    assert faulty.post(num_inference_steps=2).status_code == 200
    old_pid = faulty.counters()["pid"]
    faulty.generator.break_device.remote().result(timeout_s=30)
    broke_at = time.monotonic()

    failed = faulty.post(num_inference_steps=2)
    assert failed.status_code == 503, failed.text
    assert failed.headers["x-should-retry"] == "true"
    assert failed.headers["retry-after"] == "1"
    assert assert_error_shape(failed)["code"] == "service_unavailable"

    # Its health check now fails: Serve marks the deployment unhealthy and replaces it.
    while generator_status(faulty) != "UNHEALTHY":
        assert time.monotonic() - broke_at < 60, "Serve never saw the replica fail"
        time.sleep(0.1)
    unhealthy_s = time.monotonic() - broke_at
    # Until the new replica is up, requests fail retryably or wait for it.
    while True:
        response = faulty.post(num_inference_steps=2)
        if response.status_code == 200:
            break
        assert response.status_code in (503, 504), response.text
        assert_error_shape(response)
        assert time.monotonic() - broke_at < 120, "no replacement replica"
        time.sleep(0.2)
    recovered_s = time.monotonic() - broke_at
    assert faulty.counters()["pid"] != old_pid, "a new replica answers"
    assert [faulty.post(num_inference_steps=2).status_code for _ in range(2)] == [200] * 2
    report(
        "device error",
        failed_request_status=failed.status_code,
        unhealthy_after_s=round(unhealthy_s, 1),
        recovered_s=round(recovered_s, 1),
    )
