"""The Videos API's routes, thin over `VideoService`, as the official `openai` client calls
them: `POST /v1/videos` (a multipart form), `GET /v1/videos/{id}`, `GET /v1/videos` (a
cursor page, newest first by default), `DELETE /v1/videos/{id}` and
`GET /v1/videos/{id}/content?variant=video|thumbnail`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from deployments.ingress.bodies import form_body
from deployments.ingress.errors import invalid_request
from deployments.ingress.videos.video_protocol import (
    VideoCreateRequest,
    VideoDeleted,
    VideoList,
    VideoObject,
)
from deployments.ingress.videos.video_service import REFERENCE_FIELD, VideoService

# How long the official client's `poll` waits between retrievals of an unfinished job: the
# step progress moves in well under a second on small clips.
POLL_AFTER_MS = "500"
ANONYMOUS = "anonymous"


def owner_of(request: Request) -> str:
    """The job's owner: its API key's digest, or one owner for all when keys are off."""
    digest: bytes | None = getattr(request.state, "api_key_digest", None)
    return digest.hex() if digest else ANONYMOUS


def video_router(
    service: VideoService,
    max_upload_bytes: int,
    dependencies: list[Any],
    guard: Callable[[Request], str],
    admit: Callable[[Request, int], Awaitable[None]] | None = None,
) -> APIRouter:
    """The routes; `guard` refuses what every route of the API refuses (a malformed request
    id, a foreign origin) and returns the request's id; `admit` applies the key's quotas to
    a new job's cost."""
    router = APIRouter(dependencies=dependencies)

    @router.post("/v1/videos", openapi_extra=_form_schema())
    async def create_video(request: Request) -> VideoObject:
        request_id = guard(request)
        form = await form_body(request, max_upload_bytes, what="video request")
        try:
            return await service.create(
                form,
                owner_of(request),
                request_id,
                admit=(lambda cost: admit(request, cost)) if admit is not None else None,
            )
        finally:
            await form.close()

    @router.get("/v1/videos")
    async def list_videos(
        request: Request,
        after: str | None = None,
        limit: int = Query(default=20, ge=1, le=100),
        order: Literal["asc", "desc"] = "desc",
    ) -> VideoList:
        guard(request)
        return await service.list(owner_of(request), after, limit, order)

    @router.get("/v1/videos/{video_id}")
    async def retrieve_video(request: Request, video_id: str) -> Response:
        guard(request)
        video = await service.retrieve(owner_of(request), video_id)
        headers = (
            {}
            if video.status in ("completed", "failed")
            else {"openai-poll-after-ms": POLL_AFTER_MS}
        )
        return Response(video.model_dump_json(), media_type="application/json", headers=headers)

    @router.delete("/v1/videos/{video_id}")
    async def delete_video(request: Request, video_id: str) -> VideoDeleted:
        guard(request)
        return await service.delete(owner_of(request), video_id)

    @router.get("/v1/videos/{video_id}/content")
    async def video_content(request: Request, video_id: str, variant: str = "video") -> Response:
        guard(request)
        if variant not in ("video", "thumbnail"):
            raise invalid_request(
                f"Invalid value for 'variant': '{variant[:40]}' is not served ('video', "
                "'thumbnail').",
                param="variant",
                code="invalid_value",
            )
        data, media_type = await service.content(owner_of(request), video_id, variant)
        return Response(data, media_type=media_type)

    return router


def _form_schema() -> dict[str, Any]:
    schema = VideoCreateRequest.model_json_schema()
    schema["properties"] = {
        **schema["properties"],
        REFERENCE_FIELD: {
            "type": "string",
            "format": "binary",
            "description": "An image the video starts from (image-to-video models).",
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": schema}},
        }
    }
