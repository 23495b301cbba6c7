"""Reading request bodies: never more than the configured bytes, JSON as JSON only, and the
edit endpoint's multipart form split into its fields and its files.

Every failure is an `APIError` (400 naming what is wrong, or 413), never an exception of the
parsers: a malformed body is the client's error, not the service's.

The edit form is parsed as it streams in, never held whole: starlette's parser spools each
file (in memory up to 1 MiB, in an anonymous temporary file beyond), and the bytes received
are counted on the way in, so a body over the limit is refused as soon as it passes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, BinaryIO

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message, Receive

from deployments.ingress.errors import APIError, body_too_large, invalid_request
from deployments.ingress.protocol import ImageEditRequest
from deployments.jobs import MAX_INPUT_IMAGES

# The edit form's file fields: OpenAI's clients send `image` (one file) or `image[]` (several).
IMAGE_FIELDS = ("image", "image[]")
MASK_FIELD = "mask"
# Bounds on what the parser keeps while it reads: the most images an edit takes, a mask, and
# one file more (which gets its own 400 naming it), and no text field longer than any prompt
# could be.
MAX_FORM_FILES = MAX_INPUT_IMAGES + 2
MAX_FORM_FIELDS = 4 * len(ImageEditRequest.model_fields)
MAX_FIELD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class EditForm:
    """An edit request as sent: its text fields, its images (one, or several for a model
    that takes references; at most `MAX_INPUT_IMAGES`) and its optional mask.

    The uploads are the parser's spooled files (or `bytes`, for callers that have them),
    read in place by `deployments.ingress.uploads`; `close` releases them.
    """

    fields: dict[str, object]
    images: tuple[bytes | BinaryIO, ...]
    mask: bytes | BinaryIO | None

    def close(self) -> None:
        for upload in (*self.images, self.mask):
            if upload is not None and not isinstance(upload, bytes):
                upload.close()


async def bounded_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, read no further than `max_bytes` whatever it claims to be."""
    _check_declared_length(request, max_bytes)
    chunks = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise body_too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _check_declared_length(request: Request, max_bytes: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise body_too_large(max_bytes)


async def json_body(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body, read no further than `max_bytes` whatever it claims to be."""
    raw = await bounded_body(request, max_bytes)
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; a body nested deeper than
    # Python's recursion limit (about 1000 levels, 2 KB of brackets) is a RecursionError.
    except (ValueError, RecursionError):
        raise invalid_request(
            "We could not parse the JSON body of your request. Send a JSON object with "
            "'Content-Type: application/json'.",
            code="invalid_json",
        ) from None


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which JSON does not.
    raise ValueError(f"{name} is not JSON")


async def edit_form(request: Request, max_bytes: int) -> EditForm:
    """The edit's multipart form, from a body read no further than `max_bytes`. The caller
    owns the returned form's files (see `EditForm.close`)."""
    form = await form_body(request, max_bytes)
    try:
        return _edit_form_parts(form)
    except BaseException:
        await form.close()
        raise


def _bounded_receive(receive: Receive, max_bytes: int) -> Receive:
    """`receive`, raising 413 once the body's chunks add up to more than `max_bytes`: what
    a client declares (or leaves out, with chunked encoding) is not trusted."""
    received = 0

    async def bounded() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise body_too_large(max_bytes)
        return message

    return bounded


async def form_body(request: Request, max_bytes: int, what: str = "edit") -> FormData:
    """A multipart (or urlencoded) form, read no further than `max_bytes`; the caller closes
    it. `what` names the request in the error for a body of another type."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise invalid_request(
            f"Send the {what} as 'multipart/form-data' (files as file fields).",
            code="invalid_body",
        )
    _check_declared_length(request, max_bytes)
    counted = Request(request.scope, _bounded_receive(request.receive, max_bytes))
    try:
        return await counted.form(
            max_files=MAX_FORM_FILES,
            max_fields=MAX_FORM_FIELDS,
            max_part_size=min(MAX_FIELD_BYTES, max_bytes),
        )
    except APIError:
        raise  # the 413 of `_bounded_receive`
    except HTTPException as error:  # starlette's own words on what is wrong with the form
        if "files" in str(error.detail):  # more files than any edit takes
            raise _too_many_images() from None
        raise invalid_request(
            f"We could not parse the multipart form of your request: {error.detail}",
            code="invalid_body",
        ) from None
    except Exception:  # a malformed body, or a client that left
        raise invalid_request(
            "We could not parse the multipart form of your request.", code="invalid_body"
        ) from None


def _edit_form_parts(form: FormData) -> EditForm:
    """The form's text fields, and the files of its images and its optional mask."""
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
            fields[name] = form_value(value)
    if not images:
        raise invalid_request(
            "Missing required parameter: 'image'.", param="image", code="missing_required_parameter"
        )
    if len(images) > MAX_INPUT_IMAGES:
        raise _too_many_images()
    if len(masks) > 1:
        raise invalid_request(
            "Invalid value for 'mask': give one mask.", param="mask", code="invalid_value"
        )
    # The spooled files themselves, not their contents: the decoder reads them in place.
    return EditForm(
        fields=fields,
        images=tuple(image.file for image in images),
        mask=masks[0].file if masks else None,
    )


def _too_many_images() -> APIError:
    return invalid_request(
        f"Invalid value for 'image': an edit takes at most {MAX_INPUT_IMAGES} images.",
        param="image",
        code="invalid_value",
    )


def form_value(value: str) -> object:
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
            "description": "The image to edit, or as `image[]` several (at most "
            f"{MAX_INPUT_IMAGES}) for a model that takes reference images "
            "(`capabilities.reference_images` in `GET /v1/models`).",
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
