"""One real Ray cluster of two nodes and one Serve instance (HTTP on 127.0.0.1) for the
integration tier.

The head node has a `head` resource, the worker node an `accelerator` resource that stands in
for a GPU, so a test can place deployments the way a GPU cluster does. Both nodes run on this
machine: they share its disk, as nodes share a volume in production. Each module deploys its
own application under its own route prefix and removes it when done, so modules do not pay
for a Ray start each. The cluster lives as long as this tier: its daemons (two raylets, the
GCS, Serve's controller and proxy) would otherwise take CPU from the tiers that run after it.
"""

from __future__ import annotations

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from tests.harness import free_port

HEAD_RESOURCE = "head"
ACCELERATOR_RESOURCE = "accelerator"


@pytest.fixture(scope="package")
def cluster():
    # More logical CPUs than the machine's two: replicas of several applications fit at once,
    # and each test keeps only one of them busy.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "resources": {HEAD_RESOURCE: 1},
            "include_dashboard": False,
        },
    )
    cluster.add_node(num_cpus=2, resources={ACCELERATOR_RESOURCE: 1})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="package")
def serve_url(cluster):
    port = free_port()
    # One proxy, on the head: both nodes share this machine's ports.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
