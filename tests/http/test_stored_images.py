"""`response_format: url` when the images cannot be stored: a 503 in OpenAI's shape (or a
stream's `error` event), saying nothing of the server's disks, and whether to retry: a
passing failure is retryable, a full volume is not (a retry would regenerate the images into
it). A request that fails leaves none of its images stored."""

from __future__ import annotations

import errno
import json
from urllib.parse import urlsplit

import pytest

from deployments.storage import directory_store as storage_module

from .checks import assert_openai_error
from .test_edits import edit

GENERATIONS = "/v1/images/generations"


@pytest.fixture
def full_disk(monkeypatch, store):
    def no_space(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_module.os, "replace", no_space)
    yield
    assert list(store.directory.iterdir()) == []  # no partial file left behind


def assert_storage_unavailable(response, retry: bool) -> None:
    error = assert_openai_error(response, 503)
    assert error["code"] == "storage_unavailable" and error["type"] == "server_error"
    assert response.headers["x-should-retry"] == str(retry).lower()
    assert response.headers.get("retry-after") == ("1" if retry else None)
    assert "No space" not in response.text and "/" not in error["message"]


def test_a_full_disk_is_a_503_that_says_not_to_retry(client, full_disk):
    body = {"prompt": "a fox", "response_format": "url", "n": 2}
    assert_storage_unavailable(client.post(GENERATIONS, json=body), retry=False)
    assert_storage_unavailable(edit(client, response_format="url"), retry=False)


def test_a_passing_write_failure_is_a_retryable_503(client, store, monkeypatch):
    def io_error(source, target):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(storage_module.os, "replace", io_error)
    body = {"prompt": "a fox", "response_format": "url"}
    assert_storage_unavailable(client.post(GENERATIONS, json=body), retry=True)
    assert list(store.directory.iterdir()) == []


@pytest.mark.parametrize("stream", [False, True])
def test_images_stored_before_one_that_cannot_be_are_removed(client, store, monkeypatch, stream):
    """n=3 into a disk that fills after the first image: the answer is the 503 (or the
    stream's error event) and no image is left stored with no URL to it."""
    replace = storage_module.os.replace
    writes = []

    def fills_after_one(source, target):
        writes.append(target)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(storage_module.os, "replace", fills_after_one)
    body = {"prompt": "a fox", "response_format": "url", "n": 3, "stream": stream}
    response = client.post(GENERATIONS, json=body)
    if stream:
        assert response.text.strip().split("\n\n")[-1].startswith("event: error")
        assert "image_generation.completed" not in response.text
    else:
        assert_storage_unavailable(response, retry=False)
    assert len(writes) == 2  # the first was stored, the second failed
    assert list(store.directory.iterdir()) == []


def test_a_full_disk_does_not_touch_inline_images(client, full_disk):
    body = {"prompt": "a fox", "response_format": "b64_json"}
    assert client.post(GENERATIONS, json=body).status_code == 200


def test_a_full_disk_ends_a_stream_of_urls_with_an_error_event(client, full_disk):
    body = {"prompt": "a fox", "stream": True, "response_format": "url"}
    response = client.post(GENERATIONS, json=body)
    assert response.status_code == 200  # the stream had started
    last = response.text.strip().split("\n\n")[-1].splitlines()
    assert last[0] == "event: error"
    error = json.loads(last[1].removeprefix("data: "))["error"]
    assert error["code"] == "storage_unavailable" and "No space" not in error["message"]


def test_an_image_deleted_between_lookup_and_read_is_a_404(client, store, monkeypatch):
    """The sweeper, an eviction or another replica may delete a file at any moment."""
    url = client.post(GENERATIONS, json={"prompt": "x"}).json()["data"][0]["url"]
    path = urlsplit(url).path
    assert client.get(path).status_code == 200
    found = store.path_of

    def found_then_deleted(name):
        result = found(name)
        if result is not None:
            result.unlink()
        return result

    monkeypatch.setattr(store, "path_of", found_then_deleted)
    response = client.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "image_not_found"
