"""The OpenAI-compatible HTTP API, as a FastAPI app that knows nothing of Ray.

`create_api` builds the app around an `ImageBackend`, the thing that turns a
`GenerationJob` into pixels. On Ray Serve the backend is the generator deployment's handle
(see `deployments/ingress.py`); tests pass a fake one and call the app in-process.

The handlers validate, route by `model`, hand the job over, then encode and store the
images here, on the ingress, so generator replicas spend their time on the model alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, JSONResponse

from deployments.auth import APIKeys, bearer_token
from deployments.config import AppArgs
from deployments.encoding import encode_image, to_base64
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
from deployments.jobs import GeneratedImages, GenerationJob
from deployments.protocol import (
    MAX_SEED,
    Image,
    ImageGenerationRequest,
    ImagesResponse,
    Model,
    ModelList,
    ValidationContext,
)
from deployments.sizes import parse_size
from deployments.storage import ImageStore

logger = logging.getLogger("ray.serve")

IMAGE_FILES_PATH = "/v1/images/files"


class ImageBackend(Protocol):
    """Generates the images of a job. Raises `APIError` for failures the client should see."""

    async def generate(self, job: GenerationJob) -> GeneratedImages: ...


def request_id_of(request: Request) -> str:
    """The request's id: Ray Serve's proxy always sets `x-request-id`; otherwise make one."""
    if not hasattr(request.state, "request_id"):
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    return request.state.request_id


def create_api(args: AppArgs, backend: ImageBackend, store: ImageStore | None = None) -> FastAPI:
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
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and wrong methods, in the API's one error shape.
        message = "Not found." if exc.status_code == 404 else str(exc.detail)
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, message, type=kind))

    @app.exception_handler(RequestValidationError)
    async def _path_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_request("Invalid request parameters."))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request %s failed", request_id_of(request), exc_info=exc)
        return error_response(internal_error())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

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
            }
        },
    )
    async def generate_images(request: Request) -> ImagesResponse:
        request_id = request_id_of(request)
        body = await _json_body(request, args.limits.max_body_bytes)
        try:
            params = ImageGenerationRequest.model_validate(body, context=context)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        if params.model is not None and params.model != model_config.id:
            raise model_not_found(params.model)

        width, height = parse_size(
            params.size,
            default=model_config.default_size,
            multiple=model_config.size_multiple,
            max_pixels=args.limits.max_pixels,
        )
        first_seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        job = GenerationJob(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            width=width,
            height=height,
            num_inference_steps=params.num_inference_steps or model_config.default_steps,
            guidance_scale=(
                params.guidance_scale
                if params.guidance_scale is not None
                else model_config.default_guidance_scale
            ),
            seeds=tuple((first_seed + i) % (MAX_SEED + 1) for i in range(params.n)),
            request_id=request_id,
        )
        started_at = time.perf_counter()
        try:
            # On timeout the await is cancelled; the backend passes that on to the replica,
            # where a waiting job leaves its batch and a running one stops at its next step.
            async with asyncio.timeout(args.request_timeout_s):
                generated = await backend.generate(job)
        except TimeoutError:
            logger.warning("request %s timed out after %gs", request_id, args.request_timeout_s)
            raise timed_out(args.request_timeout_s) from None
        images = await run_in_threadpool(
            _package_images, generated, params, store, str(request.base_url), args
        )
        logger.info(
            "request %s: %d image(s) %dx%d, %d steps, user=%s; batch of %d images, "
            "generated in %.3fs, answered in %.3fs",
            request_id,
            len(images),
            width,
            height,
            job.num_inference_steps,
            params.user,
            generated.batch_images,
            generated.generate_s,
            time.perf_counter() - started_at,
        )
        return ImagesResponse(
            created=int(time.time()),
            data=images,
            output_format=params.output_format,
            size=f"{width}x{height}",
        )

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


def _package_images(
    generated: GeneratedImages,
    params: ImageGenerationRequest,
    store: ImageStore,
    request_base_url: str,
    args: AppArgs,
) -> list[Image]:
    """Encode each image, then inline it or store it and link to it. Runs in a thread."""
    base_url = (args.storage.public_base_url or request_base_url).rstrip("/")
    images = []
    for pixels, seed in zip(generated.images, generated.seeds, strict=True):
        data = encode_image(pixels, params.output_format, params.output_compression)
        if params.response_format == "b64_json":
            images.append(Image(b64_json=to_base64(data), seed=seed))
        else:
            name = store.save(data, params.output_format)
            images.append(Image(url=f"{base_url}{IMAGE_FILES_PATH}/{name}", seed=seed))
    return images


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
