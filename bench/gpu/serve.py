"""The served stack for the GPU benchmark: Ray and Serve in this process, the application that
`serve_app.build_app` builds from config/sd3.5-medium.yaml's args (with the random-weight
model's directory as `source` and one lever's `optimizations:`), redeployed once per lever.
Requests go over HTTP to Serve's proxy on 127.0.0.1, with the benchmarks' one load driver
(`bench.harness.load`); the generator's `counters()` (through a handle) report the replica's
peak GPU memory.

Not `tests.harness.ServeRun` (a `serve run` subprocess with a Ray of its own), for
two reasons: the peak GPU memory of each point is reset and read through a deployment
handle, which needs this process to be a driver of the cluster the replica runs in; and
every lever is a redeploy on the one Ray and Serve started here, where a `serve run` per
lever would pay Ray's start once more each time, out of a GPU budget of minutes.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

from bench.gpu.plan import Profile
from deployments.config.app_config import AppArgs
from deployments.config.model_config import generator_deployment_name
from serve_app import build_application, parse_args
from tests.harness import REPO, free_port, load_config

APP_NAME = "images"
MODEL_ID = "sd3.5-medium-random"
GPU_CONFIG = REPO / "config" / "sd3.5-medium.yaml"


class LeverFailed(RuntimeError):
    """The application did not come up with this lever (its message says why)."""


def app_args(
    profile: Profile,
    source: Path,
    optimizations: dict[str, Any],
    batching: dict[str, Any] | None = None,
    parallel: dict[str, Any] | None = None,
) -> AppArgs:
    """The GPU config's args, serving the model at `source` with `optimizations` (and
    `batching` over the model's own, and `parallel` if given): one replica, no API keys,
    the profile's device, dtype, size and steps. A parallel replica's placement group takes
    one bundle of the replica's `ray_actor_options` per rank, so one GPU a rank."""
    args = copy.deepcopy(load_config(GPU_CONFIG)["applications"][0]["args"])
    args.pop("auth", None)  # keys would only add a header to every request
    model = args["models"][0]
    model.update(
        id=MODEL_ID,
        source=str(source),
        device=profile.device,
        dtype=profile.dtype,
        default_size=profile.large,
        default_steps=profile.steps,
        optimizations=optimizations,
    )
    if batching:
        model["batching"] = {**model.get("batching", {}), **batching}
    if parallel:
        model["parallel"] = parallel
    deployment = model["deployment"]
    deployment.pop("autoscaling_config", None)
    deployment["num_replicas"] = 1
    deployment["ray_actor_options"] = {"num_cpus": profile.num_cpus, "num_gpus": profile.num_gpus}
    return parse_args(args)


class Stack:
    """Ray and Serve, started once; the application deployed and deleted per lever."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Stack:
        import ray
        from ray import serve

        # Ray's workers import this checkout (not another one an editable install points at).
        path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        os.environ["PYTHONPATH"] = os.pathsep.join(path)
        # Replica logs stay in Ray's session folder (/tmp/ray/session_latest/logs).
        ray.init(include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port, "request_timeout_s": 600})
        return self

    def __exit__(self, *exc_info: object) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()

    def deploy(self, args: AppArgs, timeout_s: float) -> float:
        """Deploy the application and wait until it runs; the seconds that took."""
        from ray import serve
        from ray.serve.schema import ApplicationStatus

        ingress = {"num_replicas": self.profile.ingress_replicas, "max_ongoing_requests": 512}
        started = time.monotonic()
        # Not `serve.run`: it would wait without a deadline for a replica that never starts.
        serve._run(
            build_application(args, ingress_options=ingress),
            _blocking=False,
            name=APP_NAME,
            route_prefix="/",
        )
        while time.monotonic() - started < timeout_s:
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status == ApplicationStatus.RUNNING:
                return time.monotonic() - started
            if status is not None and status.status in (
                ApplicationStatus.DEPLOY_FAILED,
                ApplicationStatus.UNHEALTHY,
            ):
                raise LeverFailed(_failure_message(status))
            time.sleep(1)
        raise LeverFailed(f"not running after {timeout_s:.0f} s")

    def undeploy(self) -> None:
        from ray import serve

        serve.delete(APP_NAME)

    def counters(self) -> dict[str, Any]:
        """The generator replica's counters (one replica: any handle call reaches it)."""
        return self._generator().counters.remote().result(timeout_s=60)

    def reset_peak_memory(self) -> None:
        self._generator().reset_peak_memory.remote().result(timeout_s=60)

    def _generator(self):
        from ray import serve

        return serve.get_deployment_handle(generator_deployment_name(MODEL_ID), APP_NAME)


def _failure_message(status: Any) -> str:
    """The application's message and its failing deployments', shortened."""
    parts = [status.message or status.status]
    for name, deployment in status.deployments.items():
        if deployment.message and deployment.status != "HEALTHY":
            parts.append(f"{name}: {deployment.message}")
    return " | ".join(part.strip() for part in parts)[-2000:]
