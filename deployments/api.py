"""The OpenAI-compatible HTTP API, as a FastAPI app that knows nothing of Ray.

`create_api` builds the app around an `ImageBackend`, the thing that turns a
`GenerationJob` into pixels. On Ray Serve the backend is the generator deployment's handle
(see `deployments/ingress.py`); tests pass a fake one and call the app in-process.

The handlers validate, route by `model`, hand the job over, then encode and store the
images here, on the ingress, so generator replicas spend their time on the model alone.
With `stream: true` the answer is server-sent events (see `deployments/streaming.py`). Each
generation request gets one log line (`deployments/request_log.py`); each error answer is
counted by the optional `ErrorMetrics`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from deployments.auth import APIKeys, bearer_token
from deployments.config import AppArgs
from deployments.errors import (
    APIError,
    body_too_large,
    error_response,
    from_validation_error,
    internal_error,
    invalid_request,
    model_not_found,
    timed_out,
    unauthorized,
)
from deployments.jobs import GeneratedImages, GenerationEvent, GenerationJob
from deployments.output import IMAGE_FILES_PATH, ImagePackager
from deployments.protocol import (
    MAX_SEED,
    ImageGenerationRequest,
    ImagesResponse,
    Model,
    ModelList,
    ValidationContext,
)
from deployments.request_log import RequestLog
from deployments.sizes import parse_size
from deployments.storage import ImageStore
from deployments.streaming import SSE_HEADERS, EventEncoder, first_event, sse_body, timings_of

logger = logging.getLogger("ray.serve")

PLAYGROUND_DIR = Path(__file__).parent / "playground"


class ImageBackend(Protocol):
    """Generates the images of a job. Raises `APIError` for failures the client should see."""

    async def generate(self, job: GenerationJob) -> GeneratedImages: ...

    def stream(self, job: GenerationJob) -> AsyncIterator[GenerationEvent]:
        """Progress and previews as the job runs, then its `GeneratedImages`; closing the
        iterator early cancels the job."""
        ...


class ErrorMetrics(Protocol):
    def error(self, error_type: str, code: str | None) -> None: ...


def request_id_of(request: Request) -> str:
    """The request's id: Ray Serve's proxy always sets `x-request-id`; otherwise make one."""
    if not hasattr(request.state, "request_id"):
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    return request.state.request_id


def create_api(
    args: AppArgs,
    backend: ImageBackend,
    store: ImageStore | None = None,
    metrics: ErrorMetrics | None = None,
) -> FastAPI:
    model_config = args.model
    context = ValidationContext(limits=args.limits, model=model_config)
    store = store or ImageStore(args.storage.resolved_directory(), args.storage.ttl_s)
    started = int(time.time())
    model_card = Model(id=model_config.id, created=started, owned_by=model_config.owned_by)
    api_keys = APIKeys(args.auth)

    async def authenticate(request: Request) -> None:
        """Routes that cost money or reveal the service take a key when auth is on."""
        if not api_keys.enabled:
            return
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                code="missing_api_key",
            )
        if not api_keys.accepts(token):
            raise unauthorized("Incorrect API key provided.", code="invalid_api_key")

    protected = [Depends(authenticate)]

    def report_error(error: APIError) -> None:
        if metrics is not None:
            metrics.error(error.type, error.code)

    def answer_error(error: APIError) -> JSONResponse:
        report_error(error)
        return error_response(error)

    app = FastAPI(
        title="Image generation service",
        description="OpenAI-compatible image generation with diffusers on Ray Serve.",
        version="0.1.0",
    )
    if args.cors.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=args.cors.allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
            expose_headers=["x-request-id", "retry-after"],
            max_age=args.cors.max_age_s,
        )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return answer_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and wrong methods, in the API's one error shape.
        message = "Not found." if exc.status_code == 404 else str(exc.detail)
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return answer_error(APIError(exc.status_code, message, type=kind))

    @app.exception_handler(RequestValidationError)
    async def _path_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer_error(invalid_request("Invalid request parameters."))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request %s failed", request_id_of(request), exc_info=exc)
        return answer_error(internal_error())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    if args.playground:
        # A page to try the service in a browser: static files, open like /health. It calls
        # the API from the browser, with the key its user types when auth is on.
        @app.get("/", include_in_schema=False)
        async def playground() -> FileResponse:
            return FileResponse(
                PLAYGROUND_DIR / "index.html", headers={"cache-control": "no-cache"}
            )

        app.mount("/playground", StaticFiles(directory=PLAYGROUND_DIR), name="playground")

    @app.get("/v1/models", dependencies=protected)
    async def list_models() -> ModelList:
        return ModelList(data=[model_card])

    @app.get("/v1/models/{model_id:path}", dependencies=protected)
    async def get_model(model_id: str) -> Model:
        if model_id != model_config.id:
            raise model_not_found(model_id)
        return model_card

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        dependencies=protected,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": ImageGenerationRequest.model_json_schema()}
                },
            },
            "responses": {
                "200": {"content": {"text/event-stream": {"description": "With `stream`."}}}
            },
        },
    )
    async def generate_images(request: Request) -> Response:
        request_id = request_id_of(request)
        log = RequestLog(request_id, "generations")
        try:
            body = await _json_body(request, args.limits.max_body_bytes)
            try:
                params = ImageGenerationRequest.model_validate(body, context=context)
            except ValidationError as exc:
                raise from_validation_error(exc) from None
            if params.model is not None and params.model != model_config.id:
                raise model_not_found(params.model)
            if (option := params.streaming_option_without_stream()) is not None:
                raise invalid_request(
                    f"Invalid value for '{option}': it needs 'stream': true.",
                    param=option,
                    code="invalid_value",
                )
            job = _job_for(params, args, request_id)
            log.add(**_logged_parameters(params, job, model_config.id, args))
            packager = ImagePackager(
                params, store, args.storage.public_base_url or str(request.base_url)
            )
            deadline = asyncio.get_running_loop().time() + args.request_timeout_s
            if params.stream:
                events = backend.stream(job)
                first = await first_event(events, deadline, args.request_timeout_s)
                frames = sse_body(
                    first,
                    events,
                    EventEncoder(params, job, packager),
                    deadline,
                    args.request_timeout_s,
                    log,
                    report_error,
                )
                return StreamingResponse(
                    frames, media_type="text/event-stream", headers=SSE_HEADERS
                )
            try:
                # On timeout the await is cancelled; the backend passes that on to the
                # replica, where a waiting job leaves its batch and a running one stops at
                # its next step.
                async with asyncio.timeout_at(deadline):
                    generated = await backend.generate(job)
            except TimeoutError:
                raise timed_out(args.request_timeout_s) from None
            encode_started = time.perf_counter()
            images = await run_in_threadpool(packager.images, generated.images, generated.seeds)
            log.add(**timings_of(generated), encode_s=time.perf_counter() - encode_started)
            log.finish(200)
            return JSONResponse(
                ImagesResponse(
                    created=int(time.time()),
                    data=images,
                    output_format=params.output_format,
                    size=f"{job.width}x{job.height}",
                ).model_dump()
            )
        except APIError as error:
            log.finish(error.status_code, error.code)
            raise
        except asyncio.CancelledError:
            log.finish(499, "client_closed_request")
            raise
        except Exception:
            log.finish(500, "internal_error")
            raise

    # Image files take no key: their 256-bit random names are the capability, like OpenAI's
    # signed URLs, so that a returned `url` works in an <img> tag or a browser.
    @app.get(IMAGE_FILES_PATH + "/{name}")
    async def get_image_file(name: str) -> FileResponse:
        path = store.path_of(name)
        if path is None:
            raise APIError(
                404,
                "No such image, or it has expired.",
                type="invalid_request_error",
                code="image_not_found",
            )
        return FileResponse(
            path,
            media_type=store.media_type(name),
            headers={"cache-control": "private, max-age=3600"},
        )

    return app


def _job_for(params: ImageGenerationRequest, args: AppArgs, request_id: str) -> GenerationJob:
    """The generator's job for a validated request, with the model's defaults filled in."""
    model = args.model
    width, height = parse_size(
        params.size,
        default=model.default_size,
        multiple=model.size_multiple,
        max_pixels=args.limits.max_pixels,
    )
    first_seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
    return GenerationJob(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=width,
        height=height,
        num_inference_steps=params.num_inference_steps or model.default_steps,
        guidance_scale=(
            params.guidance_scale
            if params.guidance_scale is not None
            else model.default_guidance_scale
        ),
        seeds=tuple((first_seed + i) % (MAX_SEED + 1) for i in range(params.n)),
        request_id=request_id,
        partial_images=params.partial_images,
    )


def _logged_parameters(
    params: ImageGenerationRequest, job: GenerationJob, model_id: str, args: AppArgs
) -> dict[str, object]:
    """What a request's log line says of what it asked for (the prompt only if configured)."""
    fields: dict[str, object] = {
        "model": model_id,
        "user": params.user,
        "n": job.num_images,
        "size": f"{job.width}x{job.height}",
        "steps": job.num_inference_steps,
        "guidance_scale": job.guidance_scale,
        "seed": job.seeds[0],
        "has_negative_prompt": job.negative_prompt is not None,
        "response_format": params.response_format,
        "output_format": params.output_format,
        "stream": params.stream,
        "partial_images": params.partial_images,
        "prompt_chars": len(job.prompt),
    }
    if args.request_logs.include_prompts:
        fields["prompt"] = job.prompt
        fields["negative_prompt"] = job.negative_prompt
    return fields


async def _json_body(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body, read no further than `max_bytes` whatever it claims to be."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise body_too_large(max_bytes)
    chunks = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise body_too_large(max_bytes)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError among them
        raise invalid_request(
            "We could not parse the JSON body of your request. Send a JSON object with "
            "'Content-Type: application/json'.",
            code="invalid_json",
        ) from None


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which JSON does not.
    raise ValueError(f"{name} is not JSON")
