"""OpenAI's Videos API: the request form and the objects, in OpenAI's field order.

`POST /v1/videos` is a multipart form (the official client sends one, with
`input_reference` as a file); the extensions (`negative_prompt`, `seed`,
`num_inference_steps`, `guidance_scale`, `num_frames`) follow OpenAI's fields, as for
images. OpenAI's `seconds` and `size` are strings; a model's config names the values it serves.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from deployments.videos.video_jobs import VideoRecord, VideoStatus

MAX_SEED = 2**32 - 1


class VideoCreateRequest(BaseModel):
    """The form's text fields (the file, `input_reference`, is read apart)."""

    model_config = ConfigDict(extra="forbid")

    # OpenAI's fields.
    prompt: StrictStr = Field(..., min_length=1, description="What the video shows.")
    model: StrictStr | None = Field(default=None, description="A video model's id.")
    seconds: StrictStr | None = Field(
        default=None,
        pattern=r"^[0-9]{1,3}$",
        description='Clip length in seconds, as a string (`"4"`); one the model serves.',
    )
    size: StrictStr | None = Field(
        default=None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="`WIDTHxHEIGHT`."
    )
    # Extensions.
    negative_prompt: StrictStr | None = Field(default=None, description="What to avoid.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Random seed.")
    num_inference_steps: int | None = Field(default=None, ge=1, description="Denoising steps.")
    guidance_scale: float | None = Field(default=None, ge=0, description="Guidance scale.")
    num_frames: int | None = Field(
        default=None,
        ge=1,
        description="Frames of the clip, in place of `seconds` x the model's frame rate.",
    )


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    """OpenAI's `video` object."""

    id: str
    object: Literal["video"] = "video"
    created_at: int
    status: VideoStatus
    model: str
    progress: int
    seconds: str
    size: str
    completed_at: int | None = None
    expires_at: int | None = None
    error: VideoError | None = None
    prompt: str | None = None
    remixed_from_video_id: str | None = None

    @classmethod
    def of(cls, record: VideoRecord) -> VideoObject:
        spec = record.spec
        error = None
        if record.error_code is not None:
            error = VideoError(code=record.error_code, message=record.error_message or "")
        return cls(
            id=record.id,
            created_at=record.created_at,
            status=record.status,
            model=spec.model,
            progress=record.progress,
            seconds=str(spec.seconds),
            size=f"{spec.width}x{spec.height}",
            completed_at=record.completed_at,
            expires_at=record.expires_at,
            error=error,
            prompt=spec.prompt,
        )


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True
