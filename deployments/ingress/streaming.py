"""The server-sent events answer of `stream: true`, in the form of OpenAI's image streaming.

Events, each `event: <type>` and `data: <JSON>`:
- `image_generation.partial_image`: a preview of one image (`partial_images` per image);
- `image_generation.progress` (extension, with `stream_progress`): denoising step of total;
- `image_generation.completed`: one per image, the last events of a successful stream;
- `error`: `{"error": {...}}` in the API's one error shape, when a stream fails after it began
  (a timeout, a replica lost); the official clients raise it as an error.
Errors found before the first event (bad input, a full queue) are plain HTTP errors instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer
from starlette.concurrency import run_in_threadpool

from deployments.ingress.deadline import Deadline
from deployments.ingress.errors import APIError, error_body, internal_error
from deployments.ingress.output import ImagePackager
from deployments.ingress.protocol import ImageRequest, Usage, without_unused_form
from deployments.ingress.request_log import RequestLog
from deployments.ingress.usage import JobCost
from deployments.jobs import GeneratedImages, GenerationEvent, GenerationJob, PartialImage

logger = logging.getLogger("ray.serve")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


# --- The events' schemas: OpenAI's fields first, then this service's extensions ---


class ImageGenerationEvent(BaseModel):
    """The fields shared by the events of a streamed generation (OpenAI's, then ours)."""

    # --- OpenAI fields ---
    background: Literal["opaque"] = "opaque"
    created_at: int = Field(description="Unix time, in seconds, of the event.")
    output_format: Literal["png", "jpeg", "webp"]
    quality: str = "auto"
    size: str = Field(description="The size of the images, `WIDTHxHEIGHT`.")


class ImageGenerationPartialImageEvent(ImageGenerationEvent):
    """`image_generation.partial_image` (`image_edit.partial_image` for edits): a preview of
    an image still being generated."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    b64_json: str
    partial_image_index: int
    # --- Extension: which image of the request (0 to n-1) this previews ---
    image_index: int


class ImageGenerationCompletedEvent(ImageGenerationEvent):
    """`image_generation.completed` (`image_edit.completed` for edits): one finished image
    (one event per image of the request).

    It carries `b64_json`, or `url` instead when the request asked for
    `response_format: url`.
    """

    type: Literal["image_generation.completed", "image_edit.completed"]
    b64_json: str | None = None
    # The whole request's usage, the same in each of its completed events.
    usage: Usage
    # --- Extensions: which image of the request, its seed, and its link ---
    image_index: int
    seed: int
    url: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unused_form(self, handler: SerializerFunctionWrapHandler) -> dict:
        return without_unused_form(handler(self))


class ImageGenerationProgressEvent(BaseModel):
    """Extension `image_generation.progress` (`image_edit.progress` for edits): denoising
    steps done (with `stream_progress`)."""

    type: Literal["image_generation.progress", "image_edit.progress"]
    created_at: int
    step: int
    total_steps: int


def sse_frame(event_type: str, data: BaseModel | dict) -> bytes:
    payload = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"event: {event_type}\ndata: {payload}\n\n".encode()


class EventEncoder:
    """Turns one request's generation events into SSE frames (in a worker thread: it encodes
    images)."""

    def __init__(
        self,
        params: ImageRequest,
        job: GenerationJob,
        packager: ImagePackager,
        event_prefix: str,
        cost: JobCost,
    ) -> None:
        self._params = params
        self._cost = cost
        self._prefix = event_prefix  # OpenAI's: `image_generation` or `image_edit`
        self._job = job
        self._packager = packager
        self._size = f"{job.width}x{job.height}"
        # Streamed images are inline, as OpenAI streams them, unless `url` is asked for by name.
        self._inline = not (
            "response_format" in params.model_fields_set and params.response_format == "url"
        )

    def frames(self, event: GenerationEvent) -> list[bytes]:
        now = int(time.time())
        common = {"created_at": now, "output_format": self._params.output_format}
        if isinstance(event, PartialImage):
            preview = self._packager.preview(event.pixels, self._job.width, self._job.height)
            partial = ImageGenerationPartialImageEvent(
                **common,
                type=f"{self._prefix}.partial_image",
                size=self._size,
                b64_json=preview,
                partial_image_index=event.partial_image_index,
                image_index=event.image_index,
            )
            return [sse_frame(partial.type, partial)]
        if isinstance(event, GeneratedImages):
            frames = []
            usage = self._cost.usage(event.text_tokens)
            # All stored before any is sent: a failure sends none, and leaves none stored.
            images = self._packager.images(event.images, event.seeds, self._inline)
            for index, (image, seed) in enumerate(zip(images, event.seeds, strict=True)):
                completed = ImageGenerationCompletedEvent(
                    **common,
                    type=f"{self._prefix}.completed",
                    size=self._size,
                    b64_json=image.b64_json,
                    url=image.url,
                    usage=usage,
                    image_index=index,
                    seed=seed,
                )
                frames.append(sse_frame(completed.type, completed))
            return frames
        if not self._params.stream_progress:
            return []
        progress = ImageGenerationProgressEvent(
            type=f"{self._prefix}.progress",
            created_at=now,
            step=event.step,
            total_steps=event.total_steps,
        )
        return [sse_frame(progress.type, progress)]


async def first_event(
    events: AsyncIterator[GenerationEvent], deadline: Deadline
) -> GenerationEvent:
    """The stream's first event, awaited before answering, so that a stream that cannot start
    (a full queue, say) is answered with a plain HTTP error and status."""
    try:
        return await deadline.wait(anext(events))
    except StopAsyncIteration:
        raise RuntimeError("the generation stream ended without an event") from None


async def sse_body(
    first: GenerationEvent,
    events: AsyncIterator[GenerationEvent],
    encoder: EventEncoder,
    deadline: Deadline,
    log: RequestLog,
    report_error: Callable[[APIError], None],
) -> AsyncIterator[bytes]:
    """The frames of a started stream. Its generation is cancelled if the client leaves."""
    status, error_code = 200, None
    encode_s = 0.0
    try:
        event = first
        while True:
            started = time.perf_counter()
            for frame in await run_in_threadpool(encoder.frames, event):
                yield frame
            encode_s += time.perf_counter() - started
            if isinstance(event, GeneratedImages):
                log.add(**timings_of(event), encode_s=encode_s)
                break
            # The deadline bounds the waits for the generator only, never a send.
            event = await deadline.wait(anext(events))
    except (asyncio.CancelledError, GeneratorExit):  # the client went away
        status, error_code = 499, "client_closed_request"
        raise
    except Exception as exc:
        if isinstance(exc, APIError):
            error = exc
        else:
            logger.exception("request %s failed while streaming", log.request_id)
            error = internal_error()
        status, error_code = error.status_code, error.code
        report_error(error)
        yield sse_frame("error", error_body(error))
    finally:
        await events.aclose()
        log.finish(status, error_code)


def timings_of(generated: GeneratedImages) -> dict[str, float | int]:
    """The replica's account of a job, for its request's log line."""
    return {
        "batch_images": generated.batch_images,
        "queue_s": generated.queue_s,
        "text_encode_s": generated.text_encode_s,
        "denoise_s": generated.denoise_s,
        "decode_s": generated.decode_s,
    }
