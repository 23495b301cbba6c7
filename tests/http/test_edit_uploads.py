"""`POST /v1/images/edits` against hostile or unusual uploads: formats other than PNG, JPEG
and WebP, headers that lie, broken files, sideways phone photos, and bodies over the limit
that are sent without saying so."""

from __future__ import annotations

import asyncio
import io
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.requests import Request

from deployments.ingress.app import create_api
from deployments.ingress.bodies import EditForm, edit_form

from ..unit.test_uploads import OTHER_FORMATS, RED, encoded, png_header_only, sideways_photo
from .checks import assert_openai_error
from .test_edits import EDITS, edit, png, with_limits

BOUNDARY = "test-boundary-7d1f"


def as_file(data: bytes, name: str = "in.png") -> tuple[str, bytes, str]:
    return (name, data, "application/octet-stream")


@pytest.mark.parametrize("format", OTHER_FORMATS)
def test_formats_other_than_png_jpeg_webp_are_a_400_naming_the_field(client, generator, format):
    other = encoded(Image.new("RGB", (64, 32), RED), format)
    error = assert_openai_error(edit(client, files={"image": as_file(other)}), 400, "image")
    assert error["code"] == "invalid_image" and "PNG, JPEG or WebP" in error["message"]
    files = {"image": as_file(png(64, 32)), "mask": as_file(other, "mask")}
    assert_openai_error(edit(client, files=files), 400, "mask")
    assert generator.jobs == []


def test_a_header_declaring_30000x30000_is_a_400_not_a_crash(client, generator):
    response = edit(client, files={"image": as_file(png_header_only(30000, 30000))})
    error = assert_openai_error(response, 400, "image")
    assert error["code"] == "invalid_image"
    assert generator.jobs == []


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_broken_files_are_a_400_naming_the_field(client, format):
    noise = np.random.default_rng(3).integers(0, 256, (64, 32, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noise), format)
    mangled = data[:16] + bytes(b ^ 0x5A for b in data[16:48]) + data[48:]
    for broken in (data[: len(data) // 2], mangled):
        assert_openai_error(edit(client, files={"image": as_file(broken)}), 400, "image")
        files = {"image": as_file(png(32, 64)), "mask": as_file(broken, "mask")}
        assert_openai_error(edit(client, files=files), 400, "mask")


def test_a_sideways_phone_photo_is_edited_upright(client, generator):
    # Stored 64x32 with EXIF orientation 6: shown, and edited, as 32x64.
    mask = encoded(Image.new("L", (32, 64), 255))
    files = {"image": as_file(sideways_photo(), "in.jpg"), "mask": as_file(mask, "mask.png")}
    response = edit(client, files=files)
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "32x64"
    (job,) = generator.jobs
    assert (job.width, job.height) == (32, 64)
    assert job.image.shape == (64, 32, 3)
    assert np.abs(job.image[:28].astype(int) - RED).max() < 40  # the stored left half, on top
    stored_size = encoded(Image.new("L", (64, 32), 255))
    files = {"image": as_file(sideways_photo()), "mask": as_file(stored_size)}
    error = assert_openai_error(edit(client, files=files), 400, "mask")
    assert "32x64" in error["message"]


def test_an_upload_larger_than_the_in_memory_spool_is_edited(client, generator):
    # Over 1 MiB: the form parser moves it to a temporary file, which the decoder reads.
    noise = np.random.default_rng(4).integers(0, 256, (512, 1024, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noise))
    assert len(data) > 1024 * 1024
    response = edit(client, files={"image": as_file(data)})
    assert response.status_code == 200, response.text
    (job,) = generator.jobs
    assert job.image.shape == (80, 176, 3)  # 1024x512 scaled into 128x128 pixels


def test_forms_past_the_parsers_bounds_are_a_400(client, generator):
    # More files than the most images an edit takes (16), and a mask, and one more.
    files = [("image[]", as_file(png(8, 8))) for _ in range(19)]
    error = assert_openai_error(edit(client, files=files), 400, "image")
    assert "at most 16 images" in error["message"]
    error = assert_openai_error(edit(client, user="u" * (1024 * 1024 + 1)), 400)
    assert error["code"] == "invalid_body"
    assert generator.jobs == []


def form_chunks(total: int, chunk: int = 16 * 1024, closed: bool = False) -> Iterator[bytes]:
    """A multipart edit body of about `total` bytes, its image sent in `chunk`-byte pieces;
    unless `closed`, without an end (a sender that does not stop)."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    for _ in range(total // chunk):
        yield bytes(chunk)
    if closed:
        yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_a_body_over_the_limit_without_content_length_is_413(args, generator, store):
    limit = 64 * 1024
    client = TestClient(
        create_api(with_limits(args, max_upload_bytes=limit), {"tiny-sd3": generator}, store)
    )
    response = client.post(
        EDITS,
        content=form_chunks(limit + 1024 * 1024),  # an iterator: chunked, no content-length
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413)
    assert generator.jobs == []


def _scope() -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": EDITS,
        "raw_path": EDITS.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "state": {},
    }


class Sender:
    """An ASGI receive channel that hands the app one chunk at a time and counts what the
    app pulled (the test client, unlike a real server, sends a body all at once)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self.pulled = 0

    async def receive(self) -> dict:
        chunk = next(self._chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        self.pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}


def test_a_streamed_body_over_the_limit_is_cut_off_as_it_passes_it(args, generator, store):
    limit = 64 * 1024
    app = create_api(with_limits(args, max_upload_bytes=limit), {"tiny-sd3": generator}, store)
    sender = Sender(form_chunks(limit + 1024 * 1024))
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(_scope(), sender.receive, send))
    assert sent[0]["status"] == 413
    # Stopped at the first chunk past the limit, not after the whole megabyte over it.
    assert limit < sender.pulled <= limit + 16 * 1024 + 1024


def test_parsing_a_large_form_holds_little_of_it_in_memory():
    size = 8 * 1024 * 1024
    sender = Sender(form_chunks(size, chunk=64 * 1024, closed=True))

    async def parse() -> EditForm:
        return await edit_form(Request(_scope(), sender.receive), 16 * 1024 * 1024)

    tracemalloc.start()
    try:
        form = asyncio.run(parse())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert sender.pulled >= size
        (image,) = form.images
        image.seek(0, io.SEEK_END)
        assert image.tell() == size  # all of it, spooled to a temporary file
        # Reading it whole into memory, even once, would take 8 MiB.
        assert peak < 3 * 1024 * 1024, f"peak {peak} bytes"
    finally:
        form.close()
