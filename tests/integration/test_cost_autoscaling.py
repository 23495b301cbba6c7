"""The cost-aware autoscaling policy on a real local Ray cluster: six clients of large
requests scale the generator out, six clients of small ones do not, though Serve's default
policy (ongoing requests, with the `target_ongoing_requests` of 1 set here) would scale out
for either."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from ray import serve

from deployments.autoscaling_policy import job_work
from deployments.config.model_config import generator_deployment_name
from serve_app import build_application, parse_args

from .helpers import one_at_a_time

pytestmark = pytest.mark.integration

GENERATIONS = "/v1/images/generations"
LARGE = {"prompt": "x", "size": "128x128", "num_inference_steps": 16}
SMALL = {"prompt": "x", "size": "32x32", "num_inference_steps": 2}
CLIENTS = 6


def args() -> dict:
    args = one_at_a_time(request_timeout_s=100)
    (model,) = args["models"]
    model["deployment"] = {
        "max_ongoing_requests": 4,
        "max_queued_requests": 64,
        "graceful_shutdown_timeout_s": 10,
        "graceful_shutdown_wait_loop_s": 0.5,
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 2,
            # What Serve's default policy would scale on: 6 clients are 6 times this.
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 30,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        },
        # Half a logical CPU each, so two replicas fit beside the other modules' apps.
        "ray_actor_options": {"num_cpus": 0.5},
    }
    # Two large requests per replica: six clients of them want three replicas; six of the
    # small ones hold 1/128 of that.
    model["autoscaling_policy"] = {
        "kind": "cost_aware",
        "target_step_pixels_per_replica": 2 * job_work(128, 128, 1, 16, None),
    }
    return args


def replicas(app: str) -> dict[str, int]:
    status = serve.status().applications[app].deployments[generator_deployment_name("tiny-sd3")]
    return dict(status.replica_states)


@contextmanager
def clients(url: str, body: dict, statuses: list[int]) -> Iterator[None]:
    """`CLIENTS` clients sending `body` one request after another while the block runs."""
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                statuses.append(http.post(url + GENERATIONS, json=body).status_code)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_large_requests_scale_out_where_as_many_small_ones_do_not(serve_url):
    app = "cost-autoscale"
    serve.run(build_application(parse_args(args())), name=app, route_prefix=f"/{app}")
    url = f"{serve_url}/{app}"
    try:
        small_statuses: list[int] = []
        seen_small: list[dict[str, int]] = []
        with clients(url, SMALL, small_statuses):
            # Longer than the default policy needs to decide here (about 2 s: the look-back
            # filling, then upscale_delay_s); a started replica would show as STARTING.
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                seen_small.append(replicas(app))
                time.sleep(0.25)
        assert all(states == {"RUNNING": 1} for states in seen_small), seen_small
        assert set(small_statuses) == {200}
        assert len(small_statuses) > 3 * CLIENTS  # the clients kept the replica busy

        large_statuses: list[int] = []
        started = time.monotonic()
        with clients(url, LARGE, large_statuses):
            while replicas(app).get("RUNNING", 0) < 2:
                assert time.monotonic() - started < 90, replicas(app)
                time.sleep(0.25)
        print(
            f"\n[cost autoscaling] 6 clients of 32x32 x 2 steps: 1 replica for 8 s "
            f"({len(small_statuses)} requests); 6 clients of 128x128 x 16 steps: 2 replicas "
            f"after {time.monotonic() - started:.1f}s"
        )
        assert set(large_statuses) == {200}
    finally:
        serve.delete(app)
