"""`storage.s3`: `url` images in an S3-compatible bucket, against a real S3 API (moto's
server on 127.0.0.1): round trips, expiry on read, names that never leave the prefix, a
bucket that cannot be used refused at start, and a store that fails or goes away answered
as `StorageUnavailable` with nothing half-stored."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest

from deployments.config.app_config import S3Config, StorageConfig
from deployments.storage import (
    ImageStore,
    StorageMisconfigured,
    StorageUnavailable,
    object_store,
    open_store,
)
from deployments.storage.object_store import S3ImageStore, make_client
from serve_app import InvalidArgs, parse_args

DOCS = Path(__file__).resolve().parents[2] / "docs/object-storage.md"


@pytest.fixture
def bucket(s3_server, s3_env) -> str:
    return s3_server.new_bucket()


@pytest.fixture
def store(s3_server, bucket) -> S3ImageStore:
    store = S3ImageStore(s3_server.config(bucket), ttl_s=60)
    yield store
    store.close()


# --- round trips ------------------------------------------------------------------------------


def test_a_saved_image_is_an_object_under_the_prefix_and_reads_back(store, s3_server, bucket):
    name = store.save(b"png-bytes", "png")
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\.png", name)
    assert store.read(name) == b"png-bytes"
    assert s3_server.keys(bucket) == [f"images/{name}"]
    head = s3_server.client().head_object(Bucket=bucket, Key=f"images/{name}")
    assert head["ContentType"] == "image/png"
    assert store.media_type(name) == "image/png"


def test_another_replicas_store_reads_what_one_saved(s3_server, bucket):
    """Two ingress replicas: separate clients, one bucket."""
    writer = S3ImageStore(s3_server.config(bucket), ttl_s=60)
    reader = S3ImageStore(s3_server.config(bucket), ttl_s=60)
    names = [writer.save(f"image {i}".encode(), "webp") for i in range(5)]
    assert [reader.read(name) for name in names] == [f"image {i}".encode() for i in range(5)]


def test_prefixes_keep_services_apart(s3_server, bucket):
    first = S3ImageStore(s3_server.config(bucket, prefix="a/"), ttl_s=60)
    second = S3ImageStore(s3_server.config(bucket, prefix="b/"), ttl_s=60)
    name = first.save(b"x", "png")
    assert first.read(name) == b"x"
    assert second.read(name) is None
    assert s3_server.keys(bucket) == [f"a/{name}"]


def test_an_unknown_name_is_none(store):
    assert store.read("A" * 43 + ".png") is None


def test_open_store_follows_the_config(s3_server, bucket, tmp_path):
    from_bucket = open_store(StorageConfig(s3=s3_server.config(bucket), ttl_s=5))
    assert isinstance(from_bucket, S3ImageStore) and from_bucket.bucket == bucket
    from_directory = open_store(StorageConfig(directory=str(tmp_path)))
    assert isinstance(from_directory, ImageStore)
    from_directory.close()


# --- expiry -----------------------------------------------------------------------------------


def test_an_expired_image_is_none_though_still_in_the_bucket(store, s3_server, bucket, monkeypatch):
    name = store.save(b"old", "png")
    now = time.time()
    monkeypatch.setattr(object_store.time, "time", lambda: now + 50)
    assert store.read(name) == b"old"  # within the TTL of 60 s
    monkeypatch.setattr(object_store.time, "time", lambda: now + 70)
    assert store.read(name) is None
    # The lifecycle rule deletes it later; until then it is only unreachable.
    assert s3_server.keys(bucket) == [f"images/{name}"]


def _documented_lifecycle_rule() -> dict:
    """The JSON rule of docs/object-storage.md (the block after its `lifecycle-rule` marker)."""
    text = DOCS.read_text()
    (block,) = re.findall(r"<!-- lifecycle-rule -->\s*```json\n(.*?)```", text, flags=re.S)
    return json.loads(block)


def test_the_documented_lifecycle_rule_is_accepted_by_the_s3_api(s3_server, bucket):
    rule = _documented_lifecycle_rule()
    client = s3_server.client()
    client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=rule)
    (applied,) = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert applied["Status"] == "Enabled"
    # It covers the default prefix, and an hour's images (the default TTL) are old enough.
    assert applied["Filter"]["Prefix"] == S3Config(bucket="abc").prefix
    assert applied["Expiration"]["Days"] * 86400 >= StorageConfig().ttl_s


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../secret.png",
        "..%2Fsecret.png",
        "/secret.png",
        "secret.png",
        "a" * 43 + ".exe",
        "a" * 42 + ".png",
        "a" * 43 + ".png/../../secret.png",
        "",
    ],
)
def test_names_of_another_shape_are_never_fetched(store, s3_server, bucket, name):
    client = s3_server.client()
    for key in ("secret.png", "images/secret.png", "images/../secret.png", f"images/{name}"):
        client.put_object(Bucket=bucket, Key=key, Body=b"secret")
    fetched = []
    store._client.meta.events.register("before-send.s3.GetObject", lambda **kw: fetched.append(1))
    assert store.read(name) is None
    assert fetched == []  # refused before any request


def test_a_name_is_read_only_under_the_prefix(store, s3_server, bucket):
    outside = "b" * 43 + ".png"
    s3_server.client().put_object(Bucket=bucket, Key=outside, Body=b"not ours")
    assert store.read(outside) is None


# --- start-up: a bucket that cannot be used is refused, naming the key ------------------------


def test_a_missing_bucket_is_refused_at_start(s3_server, s3_env):
    with pytest.raises(StorageMisconfigured, match=r"args\.storage\.s3\.bucket: .*does not exist"):
        S3ImageStore(s3_server.config("no-such-bucket"), ttl_s=60)


def test_refused_credentials_are_refused_at_start(s3_server, bucket):
    with (
        s3_server.checking_credentials(),
        pytest.raises(StorageMisconfigured, match=r"args\.storage\.s3.*refuses these credentials"),
    ):
        S3ImageStore(s3_server.config(bucket), ttl_s=60)


def test_no_credentials_at_all_are_refused_at_start(s3_server, bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageMisconfigured, match=r"args\.storage\.s3: no credentials"):
        S3ImageStore(s3_server.config(bucket), ttl_s=60)


def test_an_unreachable_endpoint_is_refused_at_start(s3_server, bucket):
    config = s3_server.config(bucket, endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(StorageMisconfigured, match=r"args\.storage\.s3\.endpoint_url: .*reached"):
        S3ImageStore(config, ttl_s=60)


# --- failures while serving -------------------------------------------------------------------


def test_a_refused_put_raises_storage_unavailable_and_stores_nothing(store, s3_server, bucket):
    with s3_server.checking_credentials(), pytest.raises(StorageUnavailable):
        store.save(b"x" * 1000, "png")
    assert s3_server.keys(bucket) == []


def test_a_refused_read_raises_storage_unavailable_not_none(store, s3_server):
    name = store.save(b"kept", "png")
    with s3_server.checking_credentials(), pytest.raises(StorageUnavailable):
        store.read(name)  # the image is there: "no such image" would be wrong
    assert store.read(name) == b"kept"


def test_a_store_that_goes_away_fails_both_ways_and_serves_again_when_back(own_s3_server, s3_env):
    bucket = own_s3_server.new_bucket()
    store = S3ImageStore(own_s3_server.config(bucket), ttl_s=60)
    kept = store.save(b"kept", "png")
    own_s3_server.stop()
    with pytest.raises(StorageUnavailable):
        store.save(b"lost", "png")
    with pytest.raises(StorageUnavailable):  # not None: the image may well be there
        store.read(kept)
    own_s3_server.start()
    assert store.read(kept) == b"kept"
    assert store.read(store.save(b"new", "png")) == b"new"
    assert len(own_s3_server.keys(bucket)) == 2  # the failed save left nothing


@pytest.fixture
def silent_endpoint():
    """A port that accepts connections and never answers: a store that hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_a_store_that_hangs_times_out_into_storage_unavailable(store, silent_endpoint):
    config = store._config.model_copy(
        update={"endpoint_url": silent_endpoint, "read_timeout_s": 0.2, "max_attempts": 1}
    )
    hung = S3ImageStore(config, ttl_s=60, client=_unchecked(config))
    with pytest.raises(StorageUnavailable, match="timeout"):
        hung.save(b"x", "png")
    with pytest.raises(StorageUnavailable, match="timeout"):
        hung.read("a" * 43 + ".png")


def _unchecked(config: S3Config):
    """A client whose start-up check passes, so that the store can be made at all."""
    client = make_client(config)
    client.head_bucket = lambda **kwargs: {}
    return client


def test_puts_carry_no_checksum_headers_that_gcs_refuses(store):
    sent = []
    store._client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **kw: sent.append(dict(request.headers))
    )
    store.save(b"x", "png")
    (headers,) = sent
    names = {name.lower() for name in headers}
    assert not {n for n in names if n.startswith("x-amz-checksum") or n == "x-amz-trailer"}
    assert "x-amz-sdk-checksum-algorithm" not in names


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["aws_access_key_id", "aws_secret_access_key", "secret_key", "session_token"]
)
def test_credentials_in_the_config_are_refused_saying_where_they_go(key):
    with pytest.raises(InvalidArgs, match=r"args\.storage\.s3: .*AWS_ACCESS_KEY_ID") as caught:
        parse_args({"storage": {"s3": {"bucket": "images", key: "AKIA..."}}})
    assert key in str(caught.value) and "AKIA" not in str(caught.value)


def test_the_bucket_is_required_and_the_rest_has_defaults():
    with pytest.raises(InvalidArgs, match=r"args\.storage\.s3\.bucket: Field required"):
        parse_args({"storage": {"s3": {}}})
    config = parse_args({"storage": {"s3": {"bucket": "images"}}}).storage.s3
    assert (config.prefix, config.endpoint_url, config.region) == ("images/", None, None)
    assert (config.addressing_style, config.max_attempts) == ("auto", 3)
    assert parse_args({}).storage.s3 is None


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"s3": {"bucket": "images"}, "directory": "/tmp/x"}, "either directory or s3"),
        ({"s3": {"bucket": "images"}, "max_bytes": 10}, "directory only"),
        ({"s3": {"bucket": "images", "prefix": "/images/"}}, "prefix"),
        ({"s3": {"bucket": "images", "endpoint_url": "minio:9000"}}, "endpoint_url"),
        ({"s3": {"bucket": "images", "addressing_style": "host"}}, "addressing_style"),
    ],
)
def test_storage_settings_that_cannot_work_are_refused(storage, message):
    with pytest.raises(InvalidArgs, match=message):
        parse_args({"storage": storage})
