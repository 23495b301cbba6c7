"""`response_format: url` with `storage.s3`: the API over a real S3 API (moto's server on
127.0.0.1). The links are the service's own `/v1/images/files/<name>`, served by any ingress
replica from the bucket; the TTL holds on read; a store that fails or goes away is the
retryable 503 `storage_unavailable`, and every URL answered in a 200 is fetchable."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import threading
import time
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api
from deployments.storage import StorageMisconfigured, object_store
from deployments.storage.object_store import S3ImageStore

from .checks import assert_openai_error
from .fakes import FakeGenerator
from .test_edits import edit

GENERATIONS = "/v1/images/generations"
FILES = "/v1/images/files/"


def bucket_args(args: AppArgs, server, bucket: str, **storage) -> AppArgs:
    """The tier's args with `storage.s3` on `bucket` (the app opens the store itself)."""
    s3 = server.config(bucket).model_dump()
    return AppArgs.model_validate(
        {**args.model_dump(), "storage": {"s3": s3, "ttl_s": 600, **storage}}
    )


def replica(args: AppArgs) -> TestClient:
    """One ingress replica: its own app, its own S3 client."""
    app = create_api(args, {"tiny-sd3": FakeGenerator()})
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def bucket(s3_server, s3_env) -> str:
    return s3_server.new_bucket()


@pytest.fixture
def s3_args(args, s3_server, bucket) -> AppArgs:
    return bucket_args(args, s3_server, bucket)


def path_of(url: str) -> str:
    return urlsplit(url).path


def name_of(url: str) -> str:
    return path_of(url).removeprefix(FILES)


def assert_storage_unavailable(response) -> None:
    error = assert_openai_error(response, 503)
    assert error["code"] == "storage_unavailable" and error["type"] == "server_error"
    assert response.headers["x-should-retry"] == "true"
    assert response.headers["retry-after"] == "1"
    assert "127.0.0.1" not in response.text and "bucket" not in error["message"]


def test_a_url_image_is_in_the_bucket_and_any_replica_serves_it(s3_args, s3_server, bucket):
    first, second = replica(s3_args), replica(s3_args)
    body = {"prompt": "a fox", "n": 2, "seed": 5}
    linked = first.post(GENERATIONS, json=body)
    assert linked.status_code == 200
    urls = [image["url"] for image in linked.json()["data"]]
    assert all(url.startswith(f"http://testserver{FILES}") for url in urls)
    assert s3_server.keys(bucket) == sorted(f"images/{name_of(url)}" for url in urls)
    inline = first.post(GENERATIONS, json={**body, "response_format": "b64_json"})
    expected = [base64.b64decode(image["b64_json"]) for image in inline.json()["data"]]
    for url, data in zip(urls, expected, strict=True):
        served = second.get(path_of(url))  # the other replica: nothing of it on local disk
        assert served.status_code == 200
        assert served.content == data
        assert served.headers["content-type"] == "image/png"


def test_urls_use_the_public_base_url(args, s3_server, bucket):
    client = replica(
        bucket_args(args, s3_server, bucket, public_base_url="https://images.example.com/")
    )
    url = client.post(GENERATIONS, json={"prompt": "x"}).json()["data"][0]["url"]
    assert url.startswith(f"https://images.example.com{FILES}")
    assert client.get(path_of(url)).status_code == 200


def test_an_expired_image_is_a_404_though_still_in_the_bucket(
    s3_args, s3_server, bucket, monkeypatch
):
    client = replica(s3_args)
    url = client.post(GENERATIONS, json={"prompt": "x"}).json()["data"][0]["url"]
    assert client.get(path_of(url)).status_code == 200
    now = time.time()
    monkeypatch.setattr(object_store.time, "time", lambda: now + s3_args.storage.ttl_s + 5)
    expired = client.get(path_of(url))
    assert assert_openai_error(expired, 404)["code"] == "image_not_found"
    assert s3_server.keys(bucket) == [f"images/{name_of(url)}"]


@pytest.mark.parametrize("name", ["..%2F..%2Fsecret.png", "secret.png", "a" * 43 + ".gif"])
def test_names_of_another_shape_are_404s(s3_args, s3_server, bucket, name):
    s3_server.client().put_object(Bucket=bucket, Key="images/secret.png", Body=b"secret")
    s3_server.client().put_object(Bucket=bucket, Key="secret.png", Body=b"secret")
    response = replica(s3_args).get(FILES + name)
    assert response.status_code == 404 and b"secret" not in response.content


def test_a_bucket_that_cannot_be_used_stops_the_ingress_from_starting(args, s3_server, s3_env):
    with pytest.raises(StorageMisconfigured, match=r"args\.storage\.s3\.bucket: .*does not exist"):
        replica(bucket_args(args, s3_server, "no-such-bucket"))
    bucket = s3_server.new_bucket()
    with (
        s3_server.checking_credentials(),
        pytest.raises(StorageMisconfigured, match="refuses these credentials"),
    ):
        replica(bucket_args(args, s3_server, bucket))


def test_refused_credentials_are_a_retryable_503_and_store_nothing(s3_args, s3_server, bucket):
    client = replica(s3_args)
    stored = client.post(GENERATIONS, json={"prompt": "x"}).json()["data"][0]["url"]
    with s3_server.checking_credentials():  # e.g. the key was revoked after the start
        assert_storage_unavailable(client.get(path_of(stored)))
        assert_storage_unavailable(client.post(GENERATIONS, json={"prompt": "x", "n": 2}))
        assert_storage_unavailable(edit(client, response_format="url"))
        inline = client.post(GENERATIONS, json={"prompt": "x", "response_format": "b64_json"})
        assert inline.status_code == 200  # no store needed
    assert s3_server.keys(bucket) == [f"images/{name_of(stored)}"]


def test_a_store_that_goes_away_is_a_503_and_serves_again_once_back(args, own_s3_server, s3_env):
    bucket = own_s3_server.new_bucket()
    client = replica(bucket_args(args, own_s3_server, bucket))
    before = client.post(GENERATIONS, json={"prompt": "x"}).json()["data"][0]["url"]
    own_s3_server.stop()
    assert_storage_unavailable(client.post(GENERATIONS, json={"prompt": "x"}))
    # Reading is a 503 too, not a 404: the image is there, the store is not.
    unreachable = client.get(path_of(before))
    assert_storage_unavailable(unreachable)
    assert "cannot be reached" in unreachable.json()["error"]["message"]
    streamed = client.post(
        GENERATIONS, json={"prompt": "x", "stream": True, "response_format": "url"}
    )
    last = streamed.text.strip().split("\n\n")[-1].splitlines()
    assert last[0] == "event: error"
    assert json.loads(last[1].removeprefix("data: "))["error"]["code"] == "storage_unavailable"
    own_s3_server.start()
    after = client.post(GENERATIONS, json={"prompt": "x"})
    assert after.status_code == 200
    assert client.get(path_of(after.json()["data"][0]["url"])).status_code == 200
    assert client.get(path_of(before)).status_code == 200


def test_every_url_answered_200_is_fetchable_while_the_store_comes_and_goes(
    args, own_s3_server, s3_env
):
    bucket = own_s3_server.new_bucket()
    writer = replica(bucket_args(args, own_s3_server, bucket))
    stop = threading.Event()

    def flap() -> None:
        while not stop.is_set():
            own_s3_server.stop()
            time.sleep(0.05)
            own_s3_server.start()
            time.sleep(0.1)

    def request(_: int):
        return writer.post(GENERATIONS, json={"prompt": "x", "n": 2})

    flapper = threading.Thread(target=flap)
    flapper.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(request, range(40)))
    finally:
        stop.set()
        flapper.join()
    answered = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    for response in refused:
        assert_storage_unavailable(response)
    assert answered, "the store was never up"
    reader = replica(bucket_args(args, own_s3_server, bucket))
    urls = [image["url"] for r in answered for image in r.json()["data"]]
    assert len(urls) == 2 * len(answered)
    for url in urls:
        assert reader.get(path_of(url)).status_code == 200


def test_the_store_is_called_in_worker_threads_never_on_the_event_loop(s3_args, monkeypatch):
    """A slow store must not stall the other requests an ingress holds."""
    on_loop = []

    def recording(method):
        def wrapper(self, *args):
            try:
                asyncio.get_running_loop()
                on_loop.append(method.__name__)
            except RuntimeError:  # no loop in this thread: a worker thread
                pass
            return method(self, *args)

        return wrapper

    for method in (S3ImageStore.save, S3ImageStore.read):
        monkeypatch.setattr(S3ImageStore, method.__name__, recording(method))
    client = replica(s3_args)
    for body in ({"prompt": "x"}, {"prompt": "x", "stream": True, "response_format": "url"}):
        response = client.post(GENERATIONS, json=body)
        assert response.status_code == 200
    url = client.post(GENERATIONS, json={"prompt": "x"}).json()["data"][0]["url"]
    assert client.get(path_of(url)).status_code == 200
    assert on_loop == []
