"""The bucket backend of `ImageStorage`: images as objects of an S3-compatible bucket, so that
every ingress replica, on any node, reads what any other one stored.

The service still serves the images at its own `/v1/images/files/<name>` (one URL shape for
both backends, the API's CORS, no bucket exposed to clients): `read` fetches the object and
answers None once it is older than the TTL, whether or not the bucket's lifecycle rule has
deleted it yet. Nothing deletes objects here; the lifecycle rule does (see
docs/object-storage.md), so the ingress needs only `s3:PutObject`, `s3:GetObject` and, for
the start-up check, `s3:ListBucket`.

A PUT is atomic: an object is readable whole or not at all. A PUT that fails (refused
credentials, a missing bucket, a store down or too slow after botocore's retries) raises
`StorageUnavailable`, and the request's answer is a 503 that names no image; an object that
a lost answer left behind is never named in a 200, so no client can reach it.

Every call is bounded: connect and read timeouts and a few retries (`S3Config`), so a dead
store fails a request in seconds instead of hanging it. Calls block; the service makes them
in worker threads, off the event loop.
"""

from __future__ import annotations

import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from deployments.config.app_config import S3Config
from deployments.storage.stored_images import (
    StorageMisconfigured,
    StorageUnavailable,
    is_image_name,
    media_type_of,
    new_name,
)

# anyio's default limit of worker threads: as many connections as threads may use at once,
# so that no call waits for, or throws away, a pooled connection.
_POOL_CONNECTIONS = 40


def client_config(config: S3Config) -> Config:
    return Config(
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        retries={"max_attempts": config.max_attempts, "mode": "standard"},
        s3={"addressing_style": config.addressing_style},
        max_pool_connections=_POOL_CONNECTIONS,
        # botocore >= 1.36 adds CRC checksums (headers and trailers) to every PUT by default;
        # GCS's S3 interface and some S3-compatible stores refuse them. Checksums only where
        # an operation requires one.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def make_client(config: S3Config):
    """An S3 client with credentials from boto3's default chain (environment, shared
    credentials file, the pod's or instance's role), never from the config."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        config=client_config(config),
    )


def _status(error: ClientError) -> int:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class S3ImageStore:
    def __init__(self, config: S3Config, ttl_s: float, client=None) -> None:
        self._config = config
        self._ttl_s = ttl_s
        self._client = client if client is not None else make_client(config)
        self.check_bucket()

    @classmethod
    def from_config(cls, config: S3Config, ttl_s: float) -> S3ImageStore:
        return cls(config, ttl_s)

    @property
    def bucket(self) -> str:
        return self._config.bucket

    def key_of(self, name: str) -> str:
        return f"{self._config.prefix}{name}"

    def _where(self) -> str:
        endpoint = self._config.endpoint_url or "AWS S3"
        return f"bucket {self.bucket!r} at {endpoint}"

    def _unavailable(self, action: str, error: Exception) -> StorageUnavailable:
        return StorageUnavailable(f"could not {action} {self._where()}: {error}")

    def check_bucket(self) -> None:
        """`StorageMisconfigured`, naming the config key to fix, unless the bucket answers."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise StorageMisconfigured(
                f"args.storage.s3: no credentials for {self._where()}: set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY in the ingress's environment, or give its pod a role"
            ) from None
        except ClientError as error:
            status = _status(error)
            if status == 404:
                reason = "does not exist (create it, or fix args.storage.s3.bucket)"
            elif status == 403:
                reason = (
                    "refuses these credentials (check AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY or the pod's role, and that they may s3:ListBucket "
                    "it)"
                )
            elif status in (301, 400):
                reason = "is in another region, or the endpoint is wrong (args.storage.s3.region)"
            else:
                reason = f"answered {status} {_code(error)}"
            raise StorageMisconfigured(
                f"args.storage.s3.bucket: {self._where()} {reason}"
            ) from None
        except BotoCoreError as error:  # no connection, a timeout, a malformed endpoint
            raise StorageMisconfigured(
                f"args.storage.s3.endpoint_url: {self._where()} cannot be reached: {error}"
            ) from None

    def save(self, data: bytes, output_format: str) -> str:
        name = new_name(output_format)
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=self.key_of(name),
                Body=data,
                ContentType=media_type_of(name),
            )
        except (BotoCoreError, ClientError) as error:
            raise self._unavailable("store an image in", error) from error
        return name

    def read(self, name: str) -> bytes | None:
        if not is_image_name(name):
            return None
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self.key_of(name))
        except ClientError as error:
            if _status(error) == 404 or _code(error) in ("NoSuchKey", "404"):
                return None
            raise self._unavailable("read an image from", error) from error
        except BotoCoreError as error:
            raise self._unavailable("read an image from", error) from error
        body = response["Body"]
        try:
            # The object's time is the store's; the age is measured on this replica's clock
            # (SigV4 already requires the two to agree within minutes).
            if time.time() - response["LastModified"].timestamp() > self._ttl_s:
                return None  # expired; the lifecycle rule deletes it in its own time
            return body.read()
        except BotoCoreError as error:  # the connection dropped or timed out mid-body
            raise self._unavailable("read an image from", error) from error
        finally:
            body.close()

    def discard(self, name: str) -> None:
        # Left to the bucket's lifecycle rule: deleting needs `s3:DeleteObject`, which the
        # ingress is not given, and an object no answer named is unreachable (its name is
        # 256 random bits) and gone at the rule's expiry.
        return None

    @staticmethod
    def media_type(name: str) -> str:
        return media_type_of(name)

    def close(self) -> None:
        self._client.close()
