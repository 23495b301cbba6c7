"""Two nodes: the generator on the node with the (stand-in) accelerator, the ingress on the
head, requests through the head's HTTP port."""

from __future__ import annotations

import httpx
import pytest
import ray
from ray import serve

from deployments.config.model_config import generator_deployment_name
from serve_app import build_application, parse_args

from .conftest import ACCELERATOR_RESOURCE, HEAD_RESOURCE
from .helpers import decode_png

pytestmark = pytest.mark.integration

ARGS = {
    "models": [{"id": "tiny-sd3", "device": "cpu", "default_size": "32x32", "default_steps": 2}]
}


def node_with(resource: str) -> str:
    (node,) = [n for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]
    return node["NodeID"]


def test_generator_on_the_accelerator_node_ingress_on_the_head(serve_url):
    app = "multinode"
    serve.run(
        build_application(
            parse_args(ARGS),
            # As `num_gpus: 1` does on a GPU cluster: only the worker node can take it.
            generator_options={
                "ray_actor_options": {"num_cpus": 0.5, "resources": {ACCELERATOR_RESOURCE: 1}}
            },
            ingress_options={
                "ray_actor_options": {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.01}}
            },
        ),
        name=app,
        route_prefix=f"/{app}",
    )
    try:
        generator = serve.get_deployment_handle(generator_deployment_name("tiny-sd3"), app_name=app)
        assert generator.counters.remote().result()["node_id"] == node_with(ACCELERATOR_RESOURCE)
        assert node_with(HEAD_RESOURCE) != node_with(ACCELERATOR_RESOURCE)

        url = f"{serve_url}/{app}/v1/images/generations"
        inline = httpx.post(url, json={"prompt": "x", "response_format": "b64_json"}, timeout=60)
        assert inline.status_code == 200
        assert decode_png(inline.json()["data"][0]["b64_json"]).shape == (32, 32, 3)
        linked = httpx.post(url, json={"prompt": "x", "n": 2}, timeout=60)
        for image in linked.json()["data"]:
            assert image["url"].startswith(f"{serve_url}/{app}/v1/images/files/")
            assert httpx.get(image["url"], timeout=30).status_code == 200
    finally:
        serve.delete(app)
