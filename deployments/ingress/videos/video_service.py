"""The Videos API's work: validate a job, record and queue it, answer for it.

Every answer comes from the job's record in Redis (`VideoJobStore`), so any ingress replica
answers for any job, and one that dies loses nothing: a job exists once its record is
written and its id queued, and `POST` answers only then. A job belongs to the API key that
made it (its digest, or `anonymous` without keys): another key sees a 404, as for a job
that never was.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from deployments.config.app_config import RequestLimits
from deployments.config.video_config import VideoConfig, VideoModelConfig
from deployments.ingress.errors import (
    APIError,
    from_validation_error,
    invalid_request,
    model_not_found,
    service_unavailable,
)
from deployments.ingress.uploads import UploadError, decode_image, image_pixels
from deployments.ingress.videos.video_protocol import (
    VideoCreateRequest,
    VideoDeleted,
    VideoList,
    VideoObject,
)
from deployments.storage import ImageStorage, StorageUnavailable
from deployments.videos.video_jobs import VideoJobStore, VideoRecord, VideoSpec, clip_frames
from deployments.videos.video_queue import VideoQueues

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
# Admits a job of this many image-steps under its key's quotas (or refuses it with a 429).
Admit = Callable[[int], Awaitable[None]]
REFERENCE_FIELD = "input_reference"


def not_found(video_id: str) -> APIError:
    return APIError(
        404,
        f"No video found with id '{video_id}'.",
        type="invalid_request_error",
        param="video_id",
        code="not_found",
    )


class VideoService:
    def __init__(
        self,
        videos: VideoConfig,
        limits: RequestLimits,
        files: ImageStorage,
        jobs: VideoJobStore,
        queues: VideoQueues,
    ) -> None:
        self._videos = videos
        self._models = videos.model_by_id()
        self._limits = limits
        self._files = files
        self._jobs = jobs
        self._queues = queues

    async def _redis(self, call: Callable[..., T], *args: Any) -> T:
        """A blocking Redis call in a thread; Redis down is a retryable 503."""
        try:
            return await asyncio.to_thread(call, *args)
        except redis.RedisError as error:
            logger.error("video jobs' Redis failed: %s", type(error).__name__)
            raise service_unavailable(
                "The video job store is unavailable. Retry shortly.", retry_after_s=2
            ) from None

    async def create(
        self, form: FormData, owner: str, request_id: str, admit: Admit | None = None
    ) -> VideoObject:
        """Validate, `admit` (the key's quotas, given the job's cost in image-steps: frames
        x steps, each frame an image), store the reference, record and queue the job."""
        fields, reference = _form_parts(form)
        try:
            request = VideoCreateRequest.model_validate(fields)
        except ValidationError as error:
            raise from_validation_error(error) from None
        model = self._model(request.model)
        limits = await self._redis(self._jobs.limits, model.id)
        spec = self._spec(request, model, limits or {})
        if reference is None and (limits or {}).get("image_to_video"):
            raise invalid_request(
                "Missing required parameter: 'input_reference' (this model makes a video "
                "from an image).",
                param=REFERENCE_FIELD,
                code="missing_required_parameter",
            )
        if admit is not None:
            await admit(_frames(spec, limits or {}) * spec.num_inference_steps)
        if reference is not None:
            spec = await self._with_reference(spec, reference, limits)
        # Shielded: a client that leaves now must not leave a record that is never queued.
        record = await asyncio.shield(self._record_and_queue(owner, spec, request_id))
        logger.info("request %s: video job %s queued on %s", request_id, record.id, spec.model)
        return VideoObject.of(record)

    async def _record_and_queue(self, owner: str, spec: VideoSpec, request_id: str) -> VideoRecord:
        record = await self._redis(self._jobs.create, owner, spec)
        try:
            await asyncio.to_thread(self._queues.enqueue, spec.model, record.id)
        except Exception as error:  # the broker (the same Redis) refused the message
            logger.error("request %s: queueing video failed: %s", request_id, error)
            try:
                await asyncio.to_thread(self._jobs.delete, record.id)
            except redis.RedisError:  # expires unfinished (`UNFINISHED_TTL_S`)
                logger.error("request %s: an unqueued record is left: %s", request_id, record.id)
            if spec.reference_name is not None:
                await asyncio.to_thread(self._files.discard, spec.reference_name)
            raise service_unavailable(
                "The video queue is unavailable. Retry shortly.", retry_after_s=2
            ) from None
        return record

    def _model(self, model_id: str | None) -> VideoModelConfig:
        if model_id is None:
            return self._videos.models[0]
        if model_id not in self._models:
            raise model_not_found(model_id)
        return self._models[model_id]

    def _spec(
        self, request: VideoCreateRequest, model: VideoModelConfig, limits: dict[str, Any]
    ) -> VideoSpec:
        """The job, checked against the config and the limits the model's replicas published
        (when one has started: before, the worker checks them and fails the job)."""
        most = self._limits.max_prompt_chars
        texts = (("prompt", request.prompt), ("negative_prompt", request.negative_prompt))
        for param, text in texts:
            if text is not None and len(text) > most:
                raise _invalid(param, f"it is longer than {most} characters")
        seconds = int(request.seconds) if request.seconds else model.seconds[0]
        if seconds not in model.seconds:
            served = ", ".join(f"'{second}'" for second in model.seconds)
            raise _invalid("seconds", f"this model makes clips of {served} seconds")
        width, height = _size(request.size or model.default_size, model, limits)
        steps = request.num_inference_steps or model.default_steps
        if steps > model.max_steps:
            raise _invalid("num_inference_steps", f"the most is {model.max_steps}")
        if request.guidance_scale is not None:
            if limits and not limits.get("guidance", True):
                raise _invalid("guidance_scale", "this model takes no guidance")
            if request.guidance_scale > self._limits.max_guidance_scale:
                raise _invalid("guidance_scale", f"the most is {self._limits.max_guidance_scale}")
        _check_frames(request.num_frames, model, limits)
        return VideoSpec(
            model=model.id,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=width,
            height=height,
            seconds=seconds,
            num_frames=request.num_frames,
            fps=model.fps,
            num_inference_steps=steps,
            guidance_scale=(
                request.guidance_scale
                if request.guidance_scale is not None
                else model.default_guidance_scale
            ),
            seed=request.seed if request.seed is not None else secrets.randbelow(2**32),
        )

    async def _with_reference(
        self, spec: VideoSpec, upload: UploadFile, limits: dict[str, Any] | None
    ) -> VideoSpec:
        if limits is not None and not limits.get("image_to_video", False):
            raise _invalid(REFERENCE_FIELD, "this model makes videos from text only")
        try:
            image = await asyncio.to_thread(
                decode_image, upload.file, REFERENCE_FIELD, self._limits.max_input_pixels
            )
        except UploadError as error:
            raise invalid_request(error.message, param=error.param, code="invalid_image") from None
        # Stored at the clip's size, as PNG: the worker reads it back, whichever it is.
        data = await asyncio.to_thread(_png_at, image, spec.width, spec.height)
        try:
            name = await asyncio.to_thread(self._files.save, data, "png")
        except StorageUnavailable as error:
            logger.error("storing an input_reference failed: %s", error)
            raise service_unavailable("The file store is unavailable. Retry shortly.") from None
        return VideoSpec(**{**spec.__dict__, "reference_name": name})

    async def retrieve(self, owner: str, video_id: str) -> VideoObject:
        return VideoObject.of(await self._owned(owner, video_id))

    async def _owned(self, owner: str, video_id: str) -> VideoRecord:
        record = await self._redis(self._jobs.owned, owner, video_id)
        if record is None:
            raise not_found(video_id)
        return record

    async def list(self, owner: str, after: str | None, limit: int, order: str) -> VideoList:
        page = await self._redis(self._jobs.list, owner, after, limit, order == "desc")
        if page is None:
            raise _invalid("after", f"'{after[:64]}' is none of your videos")
        records, has_more = page
        data = [VideoObject.of(record) for record in records]
        return VideoList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )

    async def delete(self, owner: str, video_id: str) -> VideoDeleted:
        """Delete a job in any state: a queued one never runs, a running one stops at its
        next step, a finished one's files go with it (from a directory at once; a bucket's
        lifecycle rule removes them, see the store)."""
        await self._owned(owner, video_id)
        record = await self._redis(self._jobs.delete, video_id)
        if record is None:  # deleted by a concurrent call
            raise not_found(video_id)
        names = [record.video_name, record.thumbnail_name]
        if record.status != "in_progress":
            # A running job's reference is its run's to drop (it may be reading it).
            names.append(record.spec.reference_name)
        for name in names:
            if name is not None:
                await asyncio.to_thread(self._files.discard, name)
        return VideoDeleted(id=video_id)

    async def content(self, owner: str, video_id: str, variant: str) -> tuple[bytes, str]:
        """The MP4 (`video`) or the WebP `thumbnail` of a completed job."""
        record = await self._owned(owner, video_id)
        if record.status != "completed":
            raise invalid_request(
                f"The video '{video_id}' is {record.status.replace('_', ' ')}: its content is "
                "ready once its status is 'completed'.",
                param="video_id",
                code="video_not_ready",
            )
        name = record.video_name if variant == "video" else record.thumbnail_name
        try:
            data = await asyncio.to_thread(self._files.read, name) if name else None
        except StorageUnavailable as error:
            logger.error("reading video %s failed: %s", video_id, error)
            raise service_unavailable("The file store is unavailable. Retry shortly.") from None
        if data is None:  # expired between the record's read and the file's
            raise not_found(video_id)
        return data, ("video/mp4" if variant == "video" else "image/webp")


def _png_at(image: Image.Image, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_pixels(image, width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def _frames(spec: VideoSpec, limits: dict[str, Any]) -> int:
    """The job's frames as its worker will count them; by Wan's rule (16 fps, 4k + 1, at
    most 81) before a replica of its model has published the model's own."""
    if spec.num_frames is not None:
        return spec.num_frames
    fps = spec.fps or int(limits.get("default_fps", 16))
    multiple = int(limits.get("frame_multiple", 4))
    return clip_frames(spec.seconds, fps, multiple, int(limits.get("max_frames", 81)))


def _invalid(param: str, reason: str) -> APIError:
    return invalid_request(
        f"Invalid value for '{param}': {reason}.", param=param, code="invalid_value"
    )


def _form_parts(form: FormData) -> tuple[dict[str, object], UploadFile | None]:
    fields: dict[str, object] = {}
    reference: UploadFile | None = None
    for name, value in form.multi_items():
        if name in fields or (name == REFERENCE_FIELD and reference is not None):
            raise _invalid(name, "it is given twice")
        if isinstance(value, UploadFile):
            if name != REFERENCE_FIELD:
                raise invalid_request(
                    f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter"
                )
            reference = value
        else:
            fields[name] = value  # text; the schema converts the numbers
    return fields, reference


def _size(size: str, model: VideoModelConfig, limits: dict[str, Any]) -> tuple[int, int]:
    width, height = (int(part) for part in size.split("x"))
    if model.sizes and size not in model.sizes:
        raise _invalid("size", "this model makes " + ", ".join(model.sizes))
    if width < 1 or height < 1 or width * height > model.max_pixels:
        raise _invalid("size", f"it must have at most {model.max_pixels} pixels")
    multiple = int(limits.get("size_multiple", 1))
    if width % multiple or height % multiple:
        raise _invalid("size", f"width and height must be multiples of {multiple}")
    return width, height


def _check_frames(frames: int | None, model: VideoModelConfig, limits: dict[str, Any]) -> None:
    if frames is None:
        return
    most = min(model.max_frames, int(limits.get("max_frames", model.max_frames)))
    if frames > most:
        raise _invalid("num_frames", f"the most is {most}")
    multiple = int(limits.get("frame_multiple", 1))
    if (frames - 1) % multiple:
        raise _invalid("num_frames", f"it must be {multiple} x k + 1")
