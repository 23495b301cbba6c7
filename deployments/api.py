"""The OpenAI-compatible HTTP API, as a FastAPI app that knows nothing of Ray.

`create_api` builds the app around one `ImageBackend` per model, the thing that turns a
`GenerationJob` into pixels. On Ray Serve each backend is a generator deployment's handle
(see `deployments/ingress.py`); tests pass fake ones and call the app in-process.

The handlers validate (against the chosen model's rules and what its pipeline takes), route
by `model`, hand the job over, then encode and store the images here, on the ingress, so
generator replicas spend their time on the model alone. Generations take JSON; edits take
OpenAI's multipart form with the image (and mask) files (see `deployments/uploads.py`).
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
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from deployments.auth import APIKeys, bearer_token
from deployments.config import AppArgs, ModelConfig
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
from deployments.jobs import (
    GeneratedImages,
    GenerationEvent,
    GenerationJob,
    ModelCapabilities,
)
from deployments.output import IMAGE_FILES_PATH, ImagePackager
from deployments.protocol import (
    MAX_SEED,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageRequest,
    ImagesResponse,
    Model,
    ModelList,
    ValidationContext,
)
from deployments.request_log import RequestLog
from deployments.sizes import parse_size
from deployments.storage import ImageStore
from deployments.streaming import SSE_HEADERS, EventEncoder, first_event, sse_body, timings_of
from deployments.uploads import (
    UploadError,
    decode_image,
    fit_size,
    image_pixels,
    mask_pixels,
)

logger = logging.getLogger("ray.serve")

PLAYGROUND_DIR = Path(__file__).parent / "playground"


class ImageBackend(Protocol):
    """Generates the images of a job. Raises `APIError` for failures the client should see."""

    async def generate(self, job: GenerationJob) -> GeneratedImages: ...

    async def capabilities(self) -> ModelCapabilities:
        """What the model's pipeline can do (the same for the backend's whole life)."""
        ...

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
    backends: Mapping[str, ImageBackend],
    store: ImageStore | None = None,
    metrics: ErrorMetrics | None = None,
) -> FastAPI:
    """The app, with `backends` holding one backend per model id of `args.models`."""
    models = args.model_by_id()
    if set(backends) != set(models):
        raise ValueError(f"backends for {sorted(backends)}, models {sorted(models)}")
    store = store or ImageStore(args.storage.resolved_directory(), args.storage.ttl_s)
    started = int(time.time())
    model_cards = {
        model.id: Model(id=model.id, created=started, owned_by=model.owned_by)
        for model in args.models
    }
    api_keys = APIKeys(args.auth)

    def model_for(requested: object) -> ModelConfig:
        """The model a request names, or the default one; 404 for an unknown name. (A name
        that is not a string is left to the request's validation, against the default.)"""
        if requested is None or not isinstance(requested, str):
            return models[args.default_model_id]
        if requested not in models:
            raise model_not_found(requested)
        return models[requested]

    def validate(schema: type[ImageRequest], fields: object, model: ModelConfig) -> ImageRequest:
        context = ValidationContext(limits=args.limits, model=model)
        try:
            params = schema.model_validate(fields, context=context)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        if (option := params.streaming_option_without_stream()) is not None:
            raise invalid_request(
                f"Invalid value for '{option}': it needs 'stream': true.",
                param=option,
                code="invalid_value",
            )
        return params

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
        return ModelList(data=list(model_cards.values()))

    @app.get("/v1/models/{model_id:path}", dependencies=protected)
    async def get_model(model_id: str) -> Model:
        if model_id not in model_cards:
            raise model_not_found(model_id)
        return model_cards[model_id]

    async def answer(
        request: Request,
        params: ImageRequest,
        job: GenerationJob,
        backend: ImageBackend,
        log: RequestLog,
        event_prefix: str,
        deadline: float,
    ) -> Response:
        """Run a validated job and answer with its images (or their event stream)."""
        packager = ImagePackager(
            params, store, args.storage.public_base_url or str(request.base_url)
        )
        if params.stream:
            events = backend.stream(job)
            first = await first_event(events, deadline, args.request_timeout_s)
            frames = sse_body(
                first,
                events,
                EventEncoder(params, job, packager, event_prefix),
                deadline,
                args.request_timeout_s,
                log,
                report_error,
            )
            return StreamingResponse(frames, media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            # On timeout the await is cancelled; the backend passes that on to the replica,
            # where a waiting job leaves its batch and a running one stops at its next step.
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

    async def checked(
        params: ImageRequest, backend: ImageBackend, model: ModelConfig, task: str, deadline: float
    ) -> None:
        """`check_supported` against the model's capabilities, asked of a replica the first
        time (within the request's time: the replica may still be starting)."""
        try:
            async with asyncio.timeout_at(deadline):
                capabilities = await backend.capabilities()
        except TimeoutError:
            raise timed_out(args.request_timeout_s) from None
        check_supported(params, capabilities, model, task)

    async def logged(request: Request, endpoint: str, handle) -> Response:
        """Run `handle(log, deadline)`, writing the request's one log line however it ends.
        The deadline (`request_timeout_s` from now) bounds all the request waits for."""
        log = RequestLog(request_id_of(request), endpoint)
        deadline = asyncio.get_running_loop().time() + args.request_timeout_s
        try:
            return await handle(log, deadline)
        except APIError as error:
            log.finish(error.status_code, error.code)
            raise
        except asyncio.CancelledError:
            log.finish(499, "client_closed_request")
            raise
        except Exception:
            log.finish(500, "internal_error")
            raise

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
        async def handle(log: RequestLog, deadline: float) -> Response:
            body = await _json_body(request, args.limits.max_body_bytes)
            model = model_for(body.get("model") if isinstance(body, dict) else None)
            params = validate(ImageGenerationRequest, body, model)
            backend = backends[model.id]
            await checked(params, backend, model, "text-to-image", deadline)
            job = _job_for(params, model, args, request_id_of(request))
            log.add(**_logged_parameters(params, job, model.id, args))
            return await answer(request, params, job, backend, log, "image_generation", deadline)

        return await logged(request, "generations", handle)

    @app.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        dependencies=protected,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"multipart/form-data": {"schema": _edit_form_schema()}},
            },
            "responses": {
                "200": {"content": {"text/event-stream": {"description": "With `stream`."}}}
            },
        },
    )
    async def edit_images(request: Request) -> Response:
        async def handle(log: RequestLog, deadline: float) -> Response:
            form = await _form_body(request, args.limits.max_upload_bytes)
            try:
                fields, image_file, mask_file = await _edit_form_parts(form)
            finally:
                await form.close()
            model = model_for(fields.get("model"))
            params = validate(ImageEditRequest, fields, model)
            task = "image-to-image" if mask_file is None else "inpaint"
            backend = backends[model.id]
            await checked(params, backend, model, task, deadline)
            try:
                image, mask, (width, height) = await run_in_threadpool(
                    _edit_inputs, image_file, mask_file, params, model, args
                )
            except UploadError as error:
                raise invalid_request(
                    error.message, param=error.param, code="invalid_image"
                ) from None
            job = _job_for(
                params,
                model,
                args,
                request_id_of(request),
                size=(width, height),
                image=image,
                mask=mask,
                strength=params.strength or model.default_strength,
            )
            log.add(**_logged_parameters(params, job, model.id, args))
            return await answer(request, params, job, backend, log, "image_edit", deadline)

        return await logged(request, "edits", handle)

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


def check_supported(
    params: ImageRequest, capabilities: ModelCapabilities, model: ModelConfig, task: str
) -> None:
    """400 naming the parameter if the model's pipeline cannot do what the request asks (a
    parameter it would silently ignore, or a task its family has no pipeline for)."""
    pipeline = capabilities.pipeline_class
    if task not in capabilities.tasks:
        what = "inpaint (no mask is supported)" if task == "inpaint" else "edit images"
        raise invalid_request(
            f"The model '{model.id}' ({pipeline}) cannot {what}.",
            param="mask" if task == "inpaint" else "image",
            code="unsupported_parameter",
        )
    takes = capabilities.tasks[task]
    for name in ("negative_prompt", "guidance_scale", "strength"):
        if getattr(params, name, None) is not None and name not in takes:
            raise invalid_request(
                f"The model '{model.id}' ({pipeline}) does not take '{name}'.",
                param=name,
                code="unsupported_parameter",
            )


def _job_for(
    params: ImageRequest,
    model: ModelConfig,
    args: AppArgs,
    request_id: str,
    *,
    size: tuple[int, int] | None = None,
    image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    strength: float | None = None,
) -> GenerationJob:
    """The generator's job for a validated request, with the model's defaults filled in."""
    width, height = size or parse_size(
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
        image=image,
        mask=mask,
        strength=strength,
    )


# The edit form's file fields: OpenAI's clients send `image` (one file) or `image[]` (several).
_IMAGE_FIELDS = ("image", "image[]")
_MASK_FIELD = "mask"


async def _edit_form_parts(form: FormData) -> tuple[dict[str, object], bytes, bytes | None]:
    """The form's text fields, and the contents of its one image and its optional mask."""
    fields: dict[str, object] = {}
    images: list[UploadFile] = []
    masks: list[UploadFile] = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name in _IMAGE_FIELDS:
                images.append(value)
            elif name == _MASK_FIELD:
                masks.append(value)
            else:
                raise invalid_request(
                    f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter"
                )
        elif name in _IMAGE_FIELDS or name == _MASK_FIELD:
            raise invalid_request(
                f"Invalid value for '{name}': it must be a file.", param=name, code="invalid_value"
            )
        elif name in fields:
            raise invalid_request(
                f"Invalid value for '{name}': it is given twice.", param=name, code="invalid_value"
            )
        else:
            fields[name] = _form_value(value)
    if not images:
        raise invalid_request(
            "Missing required parameter: 'image'.", param="image", code="missing_required_parameter"
        )
    if len(images) > 1:
        raise invalid_request(
            "Invalid value for 'image': these models edit one image at a time.",
            param="image",
            code="invalid_value",
        )
    if len(masks) > 1:
        raise invalid_request(
            "Invalid value for 'mask': give one mask.", param="mask", code="invalid_value"
        )
    mask = await masks[0].read() if masks else None
    return fields, await images[0].read(), mask


def _form_value(value: str) -> object:
    # Form fields are text; the flags are JSON-like `true`/`false`, and everything else is
    # left to the schema's usual coercion (`"2"` is a valid `n`).
    return {"true": True, "false": False}.get(value, value)


def _edit_inputs(
    image_file: bytes,
    mask_file: bytes | None,
    params: ImageRequest,
    model: ModelConfig,
    args: AppArgs,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """Decode the uploads and scale them to the output size (in a worker thread)."""
    limits = args.limits
    image = decode_image(image_file, "image", limits.max_input_pixels)
    mask = None
    if mask_file is not None:
        mask = decode_image(mask_file, "mask", limits.max_input_pixels)
        if mask.size != image.size:
            raise UploadError(
                "mask",
                f"The mask is {mask.size[0]}x{mask.size[1]}; it must be the image's size, "
                f"{image.size[0]}x{image.size[1]}.",
            )
    if params.size == "auto":
        width, height = fit_size(*image.size, model.size_multiple, limits.max_pixels)
    else:
        width, height = parse_size(
            params.size,
            default=model.default_size,
            multiple=model.size_multiple,
            max_pixels=limits.max_pixels,
        )
    pixels = image_pixels(image, width, height)
    redraw = mask_pixels(mask, width, height) if mask is not None else None
    return pixels, redraw, (width, height)


def _edit_form_schema() -> dict[str, Any]:
    """The edit form for the OpenAPI schema: the files, then the fields of `ImageEditRequest`."""
    schema = ImageEditRequest.model_json_schema()
    file = {"type": "string", "format": "binary"}
    schema["properties"] = {
        "image": {
            **file,
            "description": "The image to edit (or several as `image[]`; one is accepted).",
        },
        "mask": {
            **file,
            "description": "Where to redraw: transparent (alpha 0) or, without "
            "alpha, white. The image's size.",
        },
        **schema["properties"],
    }
    schema["required"] = ["image", *schema.get("required", [])]
    return schema


def _logged_parameters(
    params: ImageRequest, job: GenerationJob, model_id: str, args: AppArgs
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
        "task": job.task,
        "strength": job.strength,
        "prompt_chars": len(job.prompt),
    }
    if args.request_logs.include_prompts:
        fields["prompt"] = job.prompt
        fields["negative_prompt"] = job.negative_prompt
    return fields


async def _bounded_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, read no further than `max_bytes` whatever it claims to be."""
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
    return b"".join(chunks)


async def _form_body(request: Request, max_bytes: int) -> FormData:
    """The parsed multipart form, from a body read no further than `max_bytes`."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise invalid_request(
            "Send the edit as 'multipart/form-data' with the image as a file field.",
            code="invalid_body",
        )
    raw = await _bounded_body(request, max_bytes)

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_part_size=max_bytes)
    except Exception:  # starlette's MultiPartException, or a malformed body
        raise invalid_request(
            "We could not parse the multipart form of your request.", code="invalid_body"
        ) from None


async def _json_body(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body, read no further than `max_bytes` whatever it claims to be."""
    raw = await _bounded_body(request, max_bytes)
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
