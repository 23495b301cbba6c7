"""The README's way to run the service: `serve run config/local.yaml`, as a user would.

It runs it with the tests' harness (`tests.harness`), the one place that runs the app as a user
does, for the served benchmarks too: what this test checks is also what each of them relies on.
"""

from __future__ import annotations

import time

import httpx
import pytest

from deployments.config.model_config import generator_deployment_name
from tests.harness import REPO, ServeRun, free_port, load_config, with_overrides

from .helpers import decode_png

pytestmark = pytest.mark.integration


def test_serve_run_local_config_serves_images():
    # The only change to the shipped config: a free port instead of 8000.
    config = with_overrides(load_config(REPO / "config" / "local.yaml"), port=free_port())
    with ServeRun(config) as server:
        response, seconds = server.wait_for_first_image(timeout_s=240)
        print(f"\nserve run -> first image: {seconds:.1f} s")
        (image,) = response.json()["data"]
        assert decode_png(image["b64_json"]).shape == (64, 64, 3)
        # Each of the config's two models has its own generator replica.
        for model_id in ("tiny-sd3", "tiny-flux"):
            assert len(server.replica_processes(generator_deployment_name(model_id))) == 1
        # The console says when the service is ready, and where to send requests.
        ready = (
            f"image service ready: POST http://127.0.0.1:{config['http_options']['port']}"
            "/v1/images/generations (models: tiny-sd3, tiny-flux)"
        )
        deadline = time.monotonic() + 60
        while ready not in server.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ready in server.log_path.read_text()
        # An id that is no id: a 400, and none of the request's log lines carries it.
        malformed = "x" * 2000
        refused = httpx.post(
            f"{server.base_url}/v1/images/generations",
            json={"prompt": "a fox"},
            headers={"x-request-id": malformed},
            timeout=60,
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "x-request-id"
        time.sleep(2)  # the replica's log lines reach the console
        lines = server.log_path.read_text().splitlines()
        assert any("status=400" in line and "x-request-id" not in line for line in lines)
        # Only Serve's own access line, written outside the app, still shows what was sent.
        carrying = [line for line in lines if malformed in line]
        assert all("POST /v1/images/generations 400" in line for line in carrying), carrying
