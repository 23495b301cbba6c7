"""The ingress deployment: the HTTP front door, with no model and no GPU.

It serves the FastAPI app of `deployments/ingress/app.py` and reaches each model's generator
replicas through that model's `DeploymentHandle`, translating Ray's failures into the API's
errors.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    TaskCancelledError,
)
from ray.serve import context as serve_context
from ray.serve.context import _get_global_client, _get_internal_replica_context
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.config.app_config import AppArgs
from deployments.ingress.app import REQUEST_ID, create_api
from deployments.ingress.errors import APIError, invalid_request, service_unavailable
from deployments.ingress.moderation import moderation_blocked
from deployments.ingress.videos.video_service import VideoService
from deployments.jobs import (
    AdapterUnavailable,
    DeadlineUnreachable,
    GeneratedImages,
    GenerationEvent,
    GenerationJob,
    GenerationOutOfMemory,
    ImagesBlocked,
    ModelCapabilities,
    ReplicaBroken,
    adapter_set_id,
)
from deployments.metrics import IngressMetrics
from deployments.storage import ImageStorage, open_store
from deployments.videos.video_jobs import VideoJobStore
from deployments.videos.video_queue import VideoQueues

logger = logging.getLogger("ray.serve")

# How long the ingress waits for its application to be RUNNING before it stops waiting to
# say that the service is ready (a model that never starts is Serve's status to report), and
# how often it asks.
READY_WAIT_S = 1800.0
READY_POLL_S = 1.0

INGRESS_DEPLOYMENT = "ImageIngress"


class GeneratorClient:
    """An `ImageBackend` over one model's generator deployment handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def capabilities(self) -> ModelCapabilities:
        """Asked of a replica (every replica loads the same model: the service remembers)."""
        with generator_errors_as_api_errors("capabilities"):
            return await self._handle.capabilities.remote()

    def _routed(self, job: GenerationJob) -> DeploymentHandle:
        """The handle for a job: one with adapters goes, by Serve's model multiplexing, to a
        replica that already holds its set of adapters (one picked by load otherwise)."""
        if not job.adapters:
            return self._handle
        return self._handle.options(multiplexed_model_id=adapter_set_id(job.adapters))

    async def generate(self, job: GenerationJob) -> GeneratedImages:
        response = self._routed(job).generate.remote(job)
        with generator_errors_as_api_errors(job.request_id):
            try:
                return await response
            except asyncio.CancelledError:
                # Cancelling the await does not cancel the request on the replica (measured:
                # a timed-out request ran all its steps); cancelling the response does, and
                # the engine stops the generation at its next step.
                response.cancel()
                raise

    async def stream(self, job: GenerationJob) -> AsyncIterator[GenerationEvent]:
        responses = self._routed(job).options(stream=True).generate_stream.remote(job)
        finished = False
        try:
            with generator_errors_as_api_errors(job.request_id):
                async for event in responses:
                    yield event
            finished = True
        finally:
            if not finished:  # closed early or failed: stop the generation (see `generate`)
                responses.cancel()


@contextmanager
def generator_errors_as_api_errors(request_id: str) -> Iterator[None]:
    """Ray's and the generator's failures as the API's errors (what is left is a 500)."""
    try:
        yield
    except BackPressureError:
        raise service_unavailable(
            "The service is at capacity and its queue is full. Retry shortly.",
            retry_after_s=2,
        ) from None
    except DeadlineUnreachable as error:
        # Refused before any compute: the replica's work ahead of it would not end in time.
        raise APIError(
            503,
            "The service cannot finish this request before its timeout at its current load, "
            "so it did not start it. Retry after the time in retry-after, or allow a longer "
            "timeout.",
            type="server_error",
            code="deadline_unreachable",
            retryable=True,
            retry_after_s=error.retry_after_s,
        ) from None
    except GenerationOutOfMemory:
        # Ray re-raises the replica's exception as an instance of its class.
        logger.warning("request %s: out of device memory", request_id)
        raise service_unavailable(
            "The images did not fit in the device's memory now. Retry shortly, or ask for "
            "fewer or smaller images.",
            retry_after_s=2,
        ) from None
    except AdapterUnavailable as error:
        # A configured adapter that cannot load (missing, or not fitting the model): the
        # replica stays healthy, and the same request would fail again.
        logger.warning("request %s: %s", request_id, error)
        raise invalid_request(
            f"The adapter '{error.adapter_id}' cannot be used: {error.reason}",
            param="model",
            code="adapter_unavailable",
        ) from None
    except ImagesBlocked as error:
        raise moderation_blocked(
            "Your request was rejected by the safety system: "
            f"{error.blocked} of its {error.total} images did not pass the model's safety "
            "checker, so none is returned."
        ) from None
    except ReplicaBroken:
        # Its health check fails, and Serve replaces it; the request may succeed elsewhere.
        logger.warning("request %s: generator replica's device failed", request_id)
        raise service_unavailable(
            "The replica generating this request failed. Retry the request.", retry_after_s=1
        ) from None
    except TaskCancelledError:
        # Only this request's own cancellation cancels its generator call (its client went
        # away: Serve cancels the call with the request; or it timed out). Ray may hand the
        # ingress the cancelled call's error before it cancels the ingress's own task: that
        # is still the client leaving (a 499 in the request's log line), not a server error
        # to log with a traceback and count as a 500.
        raise asyncio.CancelledError() from None
    except (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError):
        logger.warning("request %s: generator replica unavailable", request_id, exc_info=True)
        raise service_unavailable(
            "The replica generating this request stopped. Retry the request.",
            retry_after_s=1,
        ) from None


def announce_when_ready(
    app_name: str,
    models: list[str],
    timeout_s: float = READY_WAIT_S,
    status: Callable[[], Any] = serve.status,
) -> bool:
    """Log one line, with the URL to send requests to, once the application is RUNNING
    (every deployment has its replicas, as `serve status` says): before it, a `serve run`
    console shows only start-up logs, and nothing says when the first request can be sent.
    It asks Serve's controller, never a generator, so a model scaled to zero stays at zero
    and no probe waits in a queue. Runs in a thread of its own; gives up after
    `timeout_s`, saying so."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            application = status().applications.get(app_name)
        except Exception:  # the controller is busy or restarting: ask again
            application = None
        if application is not None and application.status == "RUNNING":
            logger.info(
                "image service ready: POST %sv1/images/generations (models: %s)",
                serve_url(),
                ", ".join(models),
            )
            return True
        time.sleep(READY_POLL_S)
    logger.warning("image service not ready after %.0f s: `serve status` says why", timeout_s)
    return False


def serve_url() -> str:
    """The URL Serve's proxy answers this application at, as far as the replica can tell."""
    route = "/"
    if _get_internal_replica_context() is None:
        return route
    try:
        client = _get_global_client()
        app = client.get_serve_details()["applications"][serve.get_replica_context().app_name]
        route = app.get("route_prefix") or "/"
        http = client.http_config
        host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        return f"http://{host}:{http.port}{http.root_path}{route.rstrip('/')}/"
    except Exception:  # outside a replica, or Serve's internals moved: the path alone
        return route.rstrip("/") + "/"


def video_service(args: AppArgs, store: ImageStorage) -> VideoService | None:
    """The Videos API's service, over the jobs' Redis and queues (None without videos)."""
    if args.videos is None:
        return None
    redis_url = args.videos.resolved_redis_url()
    jobs = VideoJobStore.connect(redis_url, args.videos.key_prefix, args.videos.lease_s)
    queues = VideoQueues(args.videos, redis_url)
    return VideoService(args.videos, args.limits, store, jobs, queues)


class BoundedRequestIds:
    """ASGI middleware: a request whose `x-request-id` is not an id (`app.REQUEST_ID`) gets a
    fresh one in Serve's request context too. Ray's proxy copies the header into that
    context, and Serve's log formatter writes it into every log line of the request, the
    ingress's and its generator calls' alike; the app refuses the request with a 400 under
    the same fresh id. (Serve's access lines of the request, the proxy's and the replica's,
    are written outside the app and still show what the client sent.)"""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or ()).get(b"x-request-id")
            if given is not None and REQUEST_ID.fullmatch(given.decode("latin-1")) is None:
                fresh = uuid.uuid4().hex
                context = serve_context._serve_request_context.get()
                if context is not None:
                    serve_context._serve_request_context.set(replace(context, request_id=fresh))
                scope.setdefault("state", {})["request_id"] = fresh  # the app's `request.state`
        await self._app(scope, receive, send)


@serve.deployment(
    name=INGRESS_DEPLOYMENT,
    # The ingress only awaits the generator and encodes, so it holds many requests at once.
    max_ongoing_requests=256,
    # On redeploy or scale-down an old ingress replica still answers what it holds: give it
    # longer than any request may take (`args.request_timeout_s`), not Serve's default 20 s.
    graceful_shutdown_timeout_s=300,
    graceful_shutdown_wait_loop_s=2,
    # No CPU reserved: on Kubernetes it runs on a head node that advertises num-cpus 0.
    ray_actor_options={"num_cpus": 0},
)
@serve.ingress()
class ImageIngress:
    def __init__(
        self,
        args: AppArgs,
        generators: dict[str, DeploymentHandle],
        video_generators: dict[str, DeploymentHandle] | None = None,
    ) -> None:
        """`generators`: each model's generator deployment, by model id. `video_generators`:
        each video model's deployment (bound here so that the application deploys them:
        the ingress reaches them through their queues, never through these handles)."""
        self._args = args
        self._generators = generators
        self._video_generators = video_generators or {}
        context = _get_internal_replica_context()
        if context is not None:  # a Serve replica (tests build the app without one)
            threading.Thread(
                target=announce_when_ready,
                args=(context.app_name, [model.id for model in args.models]),
                name="ready-line",
                daemon=True,
            ).start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        backends = {
            model_id: GeneratorClient(handle) for model_id, handle in self._generators.items()
        }
        metrics = IngressMetrics()
        store = open_store(self._args.storage)
        app = create_api(
            self._args,
            backends,
            store=store,
            metrics=metrics,
            quota_metrics=metrics,
            videos=video_service(self._args, store),
        )
        app.add_middleware(BoundedRequestIds)
        return app
