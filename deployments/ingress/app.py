"""The OpenAI-compatible HTTP API, as a FastAPI app that knows nothing of Ray.

`create_api` builds the app around one `ImageBackend` per model, the thing that turns a
`GenerationJob` into pixels. On Ray Serve each backend is a generator deployment's handle
(see `deployments/ingress/deployment.py`); tests pass fake ones and call the app in-process.

The routes are thin: they read the body (`deployments/ingress/bodies.py`) and call the
`ImageService` (`deployments/ingress/service.py`), which does the work. Errors of every kind
leave in the API's one shape (`deployments/ingress/errors.py`), counted by the optional
`ErrorMetrics`.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from deployments.config.app_config import AppArgs, CORSConfig
from deployments.ingress.auth import APIKeys, bearer_token
from deployments.ingress.bodies import edit_form, edit_form_schema, json_body
from deployments.ingress.errors import (
    APIError,
    error_response,
    internal_error,
    invalid_request,
    unauthorized,
)
from deployments.ingress.output import IMAGE_FILES_PATH
from deployments.ingress.priorities import PRIORITY_HEADER, TIMEOUT_HEADER
from deployments.ingress.protocol import (
    ImageGenerationRequest,
    ImagesResponse,
    Model,
    ModelList,
)
from deployments.ingress.quotas import KeyQuotas, QuotaMetrics, QuotaSlots
from deployments.ingress.service import ErrorMetrics, ImageBackend, ImageService
from deployments.ingress.streaming import SSE_HEADERS
from deployments.ingress.videos.video_routes import video_router
from deployments.ingress.videos.video_service import VideoService
from deployments.storage import ImageStorage

logger = logging.getLogger("ray.serve")

PLAYGROUND_DIR = Path(__file__).parent / "playground"

# What a page on another origin may read of an answer when quotas are on.
RATE_LIMIT_HEADERS = [
    f"x-ratelimit-{part}-{unit}"
    for part in ("limit", "remaining", "reset")
    for unit in ("requests", "tokens")
]

# What a client's `x-request-id` may be: UUIDs, ULIDs and trace ids fit.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# The image routes answer JSON, or server-sent events with `stream`.
_STREAM_RESPONSE = {"200": {"content": {"text/event-stream": {"description": "With `stream`."}}}}


def request_id_of(request: Request) -> str:
    """The request's id: the `x-request-id` it came with (Ray Serve's proxy sets one where the
    client did not) if that is a well-formed id, otherwise a fresh one. Never a client's
    unbounded text: the id is copied into every log line of its request."""
    if not hasattr(request.state, "request_id"):
        given = request.headers.get("x-request-id")
        well_formed = given is not None and REQUEST_ID.fullmatch(given) is not None
        request.state.request_id = given if well_formed else uuid.uuid4().hex
    return request.state.request_id


def _refuse_malformed_request_id(request: Request) -> None:
    """400 for an `x-request-id` that is not an id: longer than 128 characters, or of other
    characters than an id's (letters, digits, `.`, `_`, `:`, `-`)."""
    given = request.headers.get("x-request-id")
    if given is not None and REQUEST_ID.fullmatch(given) is None:
        raise invalid_request(
            "Invalid 'x-request-id' header: at most 128 letters, digits, '.', '_', ':' or '-'.",
            param="x-request-id",
            code="invalid_value",
        )


def create_api(
    args: AppArgs,
    backends: Mapping[str, ImageBackend],
    store: ImageStorage | None = None,
    metrics: ErrorMetrics | None = None,
    quota_metrics: QuotaMetrics | None = None,
    videos: VideoService | None = None,
) -> FastAPI:
    """The app: `backends` holds a backend per model id of `args.models`; `videos`, if given,
    serves the Videos API."""
    service = ImageService(args, backends, store, metrics)
    quotas = KeyQuotas(args, quota_metrics)
    protected = [Depends(_authenticator(APIKeys(args.auth)))]
    app = _new_app(args, protected)
    if quotas.enabled:
        app.add_middleware(QuotaSlots, quotas=quotas)
    _add_cors(app, args.cors)
    _add_error_handlers(app, service)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    if args.playground:
        _add_playground(app)

    @app.get("/v1/models", dependencies=protected)
    async def list_models() -> ModelList:
        return await service.list_models()

    @app.get("/v1/models/{model_id:path}", dependencies=protected)
    async def get_model(model_id: str) -> Model:
        return await service.get_model(model_id)

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        dependencies=protected,
        openapi_extra=_body_schema("application/json", ImageGenerationRequest.model_json_schema()),
    )
    async def generate_images(request: Request) -> Response:
        async with service.scope(
            request_id_of(request), "generations", _key(request), request.headers
        ) as scope:
            _refuse_malformed_request_id(request)
            _refuse_foreign_origin(request, args.cors)
            _require_json(request)
            body = await json_body(request, args.limits.max_body_bytes)
            prepared = await service.prepare_generation(body, scope)
            await quotas.admit(request, prepared.cost.image_steps)
            return _respond(await service.run(prepared, str(request.base_url), scope))

    @app.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        dependencies=protected,
        openapi_extra=_body_schema("multipart/form-data", edit_form_schema()),
    )
    async def edit_images(request: Request) -> Response:
        async with service.scope(
            request_id_of(request), "edits", _key(request), request.headers
        ) as scope:
            _refuse_malformed_request_id(request)
            _refuse_foreign_origin(request, args.cors)
            form = await edit_form(request, args.limits.max_upload_bytes)
            try:
                prepared = await service.prepare_edit(form, scope)
            finally:
                form.close()  # the spooled upload files, whether or not they were decoded
            await quotas.admit(request, prepared.cost.image_steps)
            return _respond(await service.run(prepared, str(request.base_url), scope))

    _add_image_files(app, service)
    if videos is not None:
        _add_videos(app, args, videos, protected, quotas)
    return app


def _new_app(args: AppArgs, protected: list) -> FastAPI:
    """The bare app and its API description: with keys on, `/openapi.json` takes a key like
    the API, and the browsable `/docs` and `/redoc` are off (a browser cannot send the key)."""
    open_docs = not args.auth.enabled
    app = FastAPI(
        title="Image generation service",
        description="OpenAI-compatible image and video generation with diffusers on Ray Serve.",
        version="0.1.0",
        openapi_url="/openapi.json" if open_docs else None,
        docs_url="/docs" if open_docs else None,
        redoc_url="/redoc" if open_docs else None,
    )
    if not open_docs:
        _add_protected_docs(app, protected)
    return app


def _add_videos(
    app: FastAPI, args: AppArgs, videos: VideoService, protected: list, quotas: KeyQuotas
) -> None:
    """The Videos API, behind the same keys, quotas and refusals as the image routes."""

    def guard(request: Request) -> str:
        _refuse_malformed_request_id(request)
        _refuse_foreign_origin(request, args.cors)
        return request_id_of(request)

    admit = quotas.admit if quotas.enabled else None
    app.include_router(video_router(videos, args.limits.max_upload_bytes, protected, guard, admit))


def _key(request: Request) -> bytes | None:
    """The digest of the request's API key, once authenticated (None without keys)."""
    return getattr(request.state, "api_key_digest", None)


def _refuse_foreign_origin(request: Request, cors: CORSConfig) -> None:
    """403 for a browser's request from a page of another origin that CORS does not allow.

    A multipart form (an edit) is a "simple" request: a page on any origin can make its
    visitors' browsers POST one with no preflight, and with auth off that would spend the
    service's accelerator. Requests without `Origin` (curl, the SDKs) and the playground's
    own (same origin) pass."""
    origin = request.headers.get("origin")
    if origin is None or "*" in cors.allow_origins or origin in cors.allow_origins:
        return
    if urlsplit(origin).netloc == request.headers.get("host"):
        return
    raise APIError(
        403,
        "Requests from pages of this origin are not allowed (see the service's CORS "
        "configuration).",
        type="invalid_request_error",
        code="origin_not_allowed",
    )


def _require_json(request: Request) -> None:
    """JSON routes take `application/json` only. Anything else is a 415: a page on another
    origin can POST `text/plain` without a CORS preflight, and must not be able to make its
    visitors' browsers spend the service's accelerator."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415,
            "Send the request body as JSON with 'Content-Type: application/json'.",
            type="invalid_request_error",
            code="unsupported_media_type",
        )


def _respond(result: ImagesResponse | AsyncIterator[bytes]) -> Response:
    if isinstance(result, ImagesResponse):
        return JSONResponse(result.model_dump())
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


def _body_schema(content_type: str, schema: dict) -> dict:
    """The OpenAPI description of a route whose body the route reads itself."""
    return {
        "requestBody": {"required": True, "content": {content_type: {"schema": schema}}},
        "responses": _STREAM_RESPONSE,
    }


def _authenticator(api_keys: APIKeys):
    """The dependency of the routes that cost money or reveal the service: a valid key when
    auth is on."""

    async def authenticate(request: Request) -> None:
        if not api_keys.enabled:
            return
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                code="missing_api_key",
            )
        digest = api_keys.match(token)
        if digest is None:
            raise unauthorized("Incorrect API key provided.", code="invalid_api_key")
        request.state.api_key_digest = digest  # names the key in its quotas

    return authenticate


def _add_cors(app: FastAPI, cors: CORSConfig) -> None:
    if cors.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors.allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", PRIORITY_HEADER, TIMEOUT_HEADER],
            expose_headers=["x-request-id", "retry-after", *RATE_LIMIT_HEADERS],
            max_age=cors.max_age_s,
        )


def _add_error_handlers(app: FastAPI, service: ImageService) -> None:
    """Every error leaves in the API's one shape, and is counted."""

    def answer_error(error: APIError) -> JSONResponse:
        service.report_error(error)
        return error_response(error)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return answer_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and wrong methods.
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


def _add_protected_docs(app: FastAPI, protected: list) -> None:
    """`/openapi.json` behind the API's keys (`curl -H 'Authorization: Bearer ...'`)."""

    @app.get("/openapi.json", dependencies=protected, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())


def _add_image_files(app: FastAPI, service: ImageService) -> None:
    # Image files take no key: their 256-bit random names are the capability, like OpenAI's
    # signed URLs, so that a returned `url` works in an <img> tag or a browser.
    @app.get(IMAGE_FILES_PATH + "/{name}")
    async def get_image_file(name: str) -> Response:
        return Response(
            await run_in_threadpool(service.image_file, name),
            media_type=service.store.media_type(name),
            headers={"cache-control": "private, max-age=3600"},
        )


def _add_playground(app: FastAPI) -> None:
    """A page to try the service in a browser: static files, open like /health. It calls the
    API from the browser, with the key its user types when auth is on."""

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(PLAYGROUND_DIR / "index.html", headers={"cache-control": "no-cache"})

    app.mount("/playground", StaticFiles(directory=PLAYGROUND_DIR), name="playground")
