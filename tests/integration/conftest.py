"""One real Ray cluster and Serve instance (HTTP on 127.0.0.1) for the integration tier.

Each module deploys its own application under its own route prefix and removes it when done,
so modules do not pay for a Ray start each.
"""

from __future__ import annotations

import pytest
import ray
from ray import serve

from bench.server import free_port


@pytest.fixture(scope="session")
def serve_url():
    # More logical CPUs than the machine's two: replicas of several applications fit at once,
    # and each test keeps only one of them busy.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
