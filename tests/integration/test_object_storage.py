"""`storage.s3` in real Ray Serve: two ingress replicas share one bucket (moto's S3 API on
127.0.0.1), and an image stored by one replica is served by the other.

Which replica answered a request is read from Serve's own replica logs: each request is
sent with its own `x-request-id`, which Serve logs in the log file of the replica that
handled it. The replicas' processes share this machine's disk but not a directory of
images: a store that kept images anywhere but the bucket fails the test's check of the
bucket's keys.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
from ray import serve

from serve_app import build_application, parse_args
from tests.s3 import S3_ENV

from .conftest import HEAD_RESOURCE

pytestmark = pytest.mark.integration

APP = "s3images"
INGRESS = "ImageIngress"


def args_for(s3_server, bucket: str) -> dict:
    return {
        "models": [
            {"id": "tiny-sd3", "device": "cpu", "default_size": "32x32", "default_steps": 2}
        ],
        "storage": {"s3": s3_server.config(bucket).model_dump()},
    }


@pytest.fixture(scope="module")
def deployed(cluster, serve_url, s3_server):
    bucket = s3_server.new_bucket()
    serve.run(
        build_application(
            parse_args(args_for(s3_server, bucket)),
            generator_options={"ray_actor_options": {"num_cpus": 0.5}},
            ingress_options={
                "num_replicas": 2,
                "ray_actor_options": {
                    "num_cpus": 0,
                    # Both on the head, so that their logs are in the head's log directory.
                    "resources": {HEAD_RESOURCE: 0.01},
                    # What a pod's environment gives them: credentials for the bucket.
                    "runtime_env": {"env_vars": S3_ENV},
                },
            },
        ),
        name=APP,
        route_prefix=f"/{APP}",
    )
    logs = Path(cluster.head_node.get_logs_dir_path()) / "serve"
    yield f"{serve_url}/{APP}", bucket, logs
    serve.delete(APP)


def replica_that_handled(logs: Path, request_id: str, timeout_s: float = 15.0) -> str:
    """The replica (its log file's name) that logged the request."""
    deadline = time.monotonic() + timeout_s
    while True:
        handled = [
            path.name
            for path in logs.glob(f"replica_{APP}_{INGRESS}_*.log")
            if request_id in path.read_text(errors="replace")
        ]
        if handled or time.monotonic() > deadline:
            assert len(handled) == 1, f"request {request_id} logged by {handled}"
            return handled[0]
        time.sleep(0.1)


def test_an_image_stored_by_one_ingress_replica_is_served_by_the_other(deployed, s3_server):
    base_url, bucket, logs = deployed
    with httpx.Client(timeout=60) as client:
        stored = []  # (url, writer)
        for _ in range(6):
            request_id = f"store-{uuid.uuid4().hex}"
            response = client.post(
                f"{base_url}/v1/images/generations",
                json={"prompt": "a lighthouse", "response_format": "url"},
                headers={"x-request-id": request_id},
            )
            assert response.status_code == 200
            (image,) = response.json()["data"]
            stored.append((image["url"], replica_that_handled(logs, request_id)))
        names = sorted(url.rsplit("/", 1)[1] for url, _ in stored)
        assert s3_server.keys(bucket) == [f"images/{name}" for name in names]

        replicas = set()
        for url, writer in stored:
            # Fetched until the other replica has served it (each fetch goes to either).
            for _ in range(40):
                request_id = f"fetch-{uuid.uuid4().hex}"
                fetched = client.get(url, headers={"x-request-id": request_id})
                assert fetched.status_code == 200
                assert fetched.headers["content-type"] == "image/png"
                assert fetched.content.startswith(b"\x89PNG")
                reader = replica_that_handled(logs, request_id)
                replicas |= {writer, reader}
                if reader != writer:
                    break
            else:
                pytest.fail(f"{url} was never fetched from the replica that did not store it")
        assert len(replicas) == 2


def test_a_missing_bucket_fails_the_deploy_naming_the_key(cluster, serve_url, s3_server):
    """What `serve status` shows an operator: the ingress's error, naming the key to fix."""
    app = "s3missing"
    try:
        with pytest.raises(RuntimeError, match="failed"):
            serve.run(
                build_application(
                    parse_args(args_for(s3_server, "no-such-bucket")),
                    generator_options={"ray_actor_options": {"num_cpus": 0.5}},
                    ingress_options={
                        "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": S3_ENV}},
                        # One try, not Serve's three: the error is the same each time.
                        "max_constructor_retry_count": 1,
                    },
                ),
                name=app,
                route_prefix=f"/{app}",
            )
        ingress = serve.status().applications[app].deployments[INGRESS]
        assert ingress.status == "DEPLOY_FAILED"
        assert re.search(r"args\.storage\.s3\.bucket: .*does not exist", ingress.message)
    finally:
        serve.delete(app)
