"""Serve's autoscaler on a real local Ray cluster, driven by HTTP load on the generator.

The configs here set short delays so that the test takes seconds; the GPU config uses the
same fields with production values (see docs/operations.md, "Autoscaling"). The measured
scale-up and scale-down times are printed (`pytest -s`).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from ray import serve

from deployments.config.model_config import generator_deployment_name
from serve_app import build_application, parse_args

from .helpers import one_at_a_time

pytestmark = pytest.mark.integration

GENERATIONS = "/v1/images/generations"
ARGS = one_at_a_time(request_timeout_s=100)
FAST_AUTOSCALING = {
    "target_ongoing_requests": 1,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,
}


def deploy(serve_url: str, name: str, autoscaling: dict) -> str:
    options = {
        "max_ongoing_requests": 4,
        "max_queued_requests": 64,
        "graceful_shutdown_timeout_s": 10,
        "graceful_shutdown_wait_loop_s": 0.5,
        "autoscaling_config": {**FAST_AUTOSCALING, **autoscaling},
        # Half a logical CPU each, so two replicas fit beside the other modules' apps.
        "ray_actor_options": {"num_cpus": 0.5},
    }
    serve.run(build_application(parse_args(ARGS), options), name=name, route_prefix=f"/{name}")
    return f"{serve_url}/{name}"


def running_replicas(app: str) -> int:
    status = serve.status().applications[app].deployments[generator_deployment_name("tiny-sd3")]
    return status.replica_states.get("RUNNING", 0)


def wait_for_replicas(app: str, count: int, timeout_s: float) -> float:
    """Seconds until the generator has exactly `count` running replicas."""
    started = time.monotonic()
    while running_replicas(app) != count:
        assert time.monotonic() - started < timeout_s, (
            f"{app}: still {running_replicas(app)} replicas, not {count}, after {timeout_s}s"
        )
        time.sleep(0.25)
    return time.monotonic() - started


def test_load_scales_the_generator_out_and_idling_scales_it_back(serve_url):
    app = "autoscale"
    url = deploy(serve_url, app, {"min_replicas": 1, "max_replicas": 2})
    try:
        assert running_replicas(app) == 1
        stop = threading.Event()
        statuses: list[int] = []

        def client() -> None:
            with httpx.Client(timeout=120) as http:
                while not stop.is_set():
                    response = http.post(
                        url + GENERATIONS, json={"prompt": "x", "num_inference_steps": 30}
                    )
                    statuses.append(response.status_code)

        clients = [threading.Thread(target=client) for _ in range(6)]
        load_started = time.monotonic()
        for thread in clients:
            thread.start()
        try:
            scale_up_s = wait_for_replicas(app, 2, timeout_s=90)
        finally:
            stop.set()
            for thread in clients:
                thread.join()
        load_ended = time.monotonic()
        scale_down_s = wait_for_replicas(app, 1, timeout_s=90)
        print(
            f"\n[autoscaling] 1 -> 2 replicas {scale_up_s:.1f}s after 6 clients started; "
            f"2 -> 1 {scale_down_s:.1f}s after they stopped "
            f"(upscale_delay_s {FAST_AUTOSCALING['upscale_delay_s']}, downscale_delay_s "
            f"{FAST_AUTOSCALING['downscale_delay_s']}); {len(statuses)} requests in "
            f"{load_ended - load_started:.1f}s"
        )
        assert set(statuses) == {200}
    finally:
        serve.delete(app)


def test_from_zero_replicas_the_first_request_waits_and_succeeds(serve_url):
    app = "scale-from-zero"
    url = deploy(serve_url, app, {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 1})
    try:
        # Warm, then idle until the autoscaler takes the last replica away.
        assert httpx.post(url + GENERATIONS, json={"prompt": "x"}, timeout=60).status_code == 200
        to_zero_s = wait_for_replicas(app, 0, timeout_s=90)
        started = time.monotonic()
        response = httpx.post(url + GENERATIONS, json={"prompt": "x"}, timeout=120)
        cold_s = time.monotonic() - started
        print(
            f"\n[autoscaling] idle -> 0 replicas in {to_zero_s:.1f}s; the next request waited "
            f"{cold_s:.1f}s for a new replica and got {response.status_code}"
        )
        assert response.status_code == 200, response.text
        assert cold_s < ARGS["request_timeout_s"]
    finally:
        serve.delete(app)
