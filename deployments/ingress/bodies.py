"""Reading request bodies: never more than the configured bytes, JSON as JSON only, and the
edit endpoint's multipart form split into its fields and its files.

Every failure is an `APIError` (400 naming what is wrong, or 413), never an exception of the
parsers: a malformed body is the client's error, not the service's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from deployments.ingress.errors import body_too_large, invalid_request
from deployments.ingress.protocol import ImageEditRequest

# The edit form's file fields: OpenAI's clients send `image` (one file) or `image[]` (several).
IMAGE_FIELDS = ("image", "image[]")
MASK_FIELD = "mask"


@dataclass(frozen=True)
class EditForm:
    """An edit request as sent: its text fields, and the bytes of its image and mask."""

    fields: dict[str, object]
    image: bytes
    mask: bytes | None


async def bounded_body(request: Request, max_bytes: int) -> bytes:
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


async def json_body(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body, read no further than `max_bytes` whatever it claims to be."""
    raw = await bounded_body(request, max_bytes)
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


async def edit_form(request: Request, max_bytes: int) -> EditForm:
    """The edit's multipart form, from a body read no further than `max_bytes`."""
    form = await _form_body(request, max_bytes)
    try:
        return await _edit_form_parts(form)
    finally:
        await form.close()


async def _form_body(request: Request, max_bytes: int) -> FormData:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise invalid_request(
            "Send the edit as 'multipart/form-data' with the image as a file field.",
            code="invalid_body",
        )
    raw = await bounded_body(request, max_bytes)

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_part_size=max_bytes)
    except Exception:  # starlette's MultiPartException, or a malformed body
        raise invalid_request(
            "We could not parse the multipart form of your request.", code="invalid_body"
        ) from None


async def _edit_form_parts(form: FormData) -> EditForm:
    """The form's text fields, and the contents of its one image and its optional mask."""
    fields: dict[str, object] = {}
    images: list[UploadFile] = []
    masks: list[UploadFile] = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name in IMAGE_FIELDS:
                images.append(value)
            elif name == MASK_FIELD:
                masks.append(value)
            else:
                raise invalid_request(
                    f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter"
                )
        elif name in IMAGE_FIELDS or name == MASK_FIELD:
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
    return EditForm(fields=fields, image=await images[0].read(), mask=mask)


def _form_value(value: str) -> object:
    # Form fields are text; the flags are JSON-like `true`/`false`, and everything else is
    # left to the schema's usual coercion (`"2"` is a valid `n`).
    return {"true": True, "false": False}.get(value, value)


def edit_form_schema() -> dict[str, Any]:
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
