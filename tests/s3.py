"""A real S3 API for the tests: moto's server on 127.0.0.1, which can be stopped and started
again on its port (a store that goes away and comes back). Its buckets live in this process,
so they outlive a stop; Ray replicas on this machine reach it over HTTP like any store."""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
from moto import settings as moto_settings
from moto.core.authorization import ActionAuthenticatorMixin
from moto.server import ThreadedMotoServer

from deployments.config.app_config import S3Config
from tests.harness import free_port

# What the ingress's boto3 finds in its environment; moto accepts any key while it does not
# check credentials (see `S3Server.checking_credentials`).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test-access-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Nothing from this machine's files or an instance's metadata service.
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self._server: ThreadedMotoServer | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @functools.cached_property
    def _client(self):
        return boto3.session.Session(
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint_url)

    def client(self):
        """The tests' own client (not the service's), with the dummy credentials."""
        return self._client

    def new_bucket(self) -> str:
        name = f"images-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def config(self, bucket: str, **overrides: Any) -> S3Config:
        # Short timeouts: a stopped server refuses at once anyway; a test never waits long.
        return S3Config.model_validate(
            {
                "bucket": bucket,
                "endpoint_url": self.endpoint_url,
                "addressing_style": "path",
                "connect_timeout_s": 1,
                "read_timeout_s": 2,
                "max_attempts": 2,
                **overrides,
            }
        )

    def keys(self, bucket: str) -> list[str]:
        listed = self.client().list_objects_v2(Bucket=bucket)
        return sorted(item["Key"] for item in listed.get("Contents", []))

    @staticmethod
    @contextlib.contextmanager
    def checking_credentials() -> Iterator[None]:
        """While inside, moto refuses access keys it did not issue (as AWS refuses wrong
        ones); the tests' client is refused too."""
        saved = moto_settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0
        try:
            yield
        finally:
            moto_settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = (
                saved
            )
