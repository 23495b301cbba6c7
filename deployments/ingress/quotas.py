"""Per-key quotas (`auth.quotas`): who may run how much, told the way OpenAI tells it.

An image request whose key is within its limits is admitted once it is validated (so that
its cost in image-steps, `usage.output_tokens`, is known) and before it is queued; one over a
limit is a 429 in the API's error shape with OpenAI's `x-ratelimit-*` headers (`-tokens`
counting image-steps) and `retry-after`. The counts live in Redis (`quota_store.py`).

A concurrency slot is released when its request's response ends, however it ends (sent,
failed, the client gone, the stream closed): `QuotaSlots`, around the whole app, releases
what the request took. An ingress that dies leaves its slots to expire (`slot_ttl_s`).
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.config.app_config import AppArgs
from deployments.config.quota_config import KeyLimits, QuotaConfig, check_redis_url
from deployments.ingress.errors import quota_store_unavailable, rate_limited
from deployments.ingress.quota_store import Counts, QuotaStoreError, RedisQuotaStore

logger = logging.getLogger("ray.serve")

# Where a request's admissions wait for `QuotaSlots` (in the ASGI scope's `state`).
ADMISSIONS = "quota_admissions"
# The store's trouble is logged at most this often (every request would log it otherwise).
WARNING_INTERVAL_S = 10.0


class QuotaMetrics(Protocol):
    def key_request(self, key: str, outcome: str, image_steps: int) -> None: ...

    def quota_store_error(self, operation: str) -> None: ...


@dataclass
class Admission:
    key_id: str
    slot_id: str | None
    headers: dict[str, str] = field(default_factory=dict)


def format_duration(ms: int) -> str:
    """OpenAI's form of a time to reset: `20ms`, `1.5s`, `1m0s`."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def limit_headers(limits: KeyLimits, counts: Counts) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers: `-requests` for requests, `-tokens` for image-steps."""
    headers = {}
    reset = format_duration(counts.reset_ms)
    for suffix, limit, used in (
        ("requests", limits.requests, counts.requests),
        ("tokens", limits.image_steps, counts.image_steps),
    ):
        if limit is not None:
            headers[f"x-ratelimit-limit-{suffix}"] = str(limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(max(limit - used, 0))
            headers[f"x-ratelimit-reset-{suffix}"] = reset
    return headers


def redis_of(config: QuotaConfig) -> tuple[str, str | None]:
    """The Redis URL and password the config points at; ValueError naming the setting."""
    url = config.redis_url
    if config.redis_url_env is not None:
        url = os.environ.get(config.redis_url_env, "").strip()
        if not url:
            raise ValueError(f"auth.quotas.redis_url_env: ${config.redis_url_env} is not set")
        try:
            check_redis_url(url)
        except ValueError as error:
            raise ValueError(
                f"auth.quotas.redis_url_env: ${config.redis_url_env}: {error}"
            ) from None
    password = None
    if config.redis_password_env is not None:
        password = os.environ.get(config.redis_password_env)
        if password is None:
            raise ValueError(
                f"auth.quotas.redis_password_env: ${config.redis_password_env} is not set"
            )
    assert url is not None  # the config has one of the two
    return url, password


class KeyQuotas:
    """The quotas of every key, for one app. Off (admits all) without `auth.quotas`."""

    def __init__(self, args: AppArgs, metrics: QuotaMetrics | None = None) -> None:
        self.config = args.auth.quotas
        self._metrics = metrics
        self._last_warning = -math.inf
        self._labels: dict[bytes, str] = {}
        if self.config is None:
            return
        url, password = redis_of(self.config)
        self._store = RedisQuotaStore(
            url,
            password,
            timeout_s=self.config.store_timeout_s,
            prefix=self.config.key_prefix,
            window_s=self.config.window_s,
            slot_ttl_s=self.config.slot_ttl_s or args.request_timeout_s + 60,
        )
        self._named = {bytes.fromhex(key.key_sha256): key for key in self.config.keys}
        for digest, key in self._named.items():
            self._labels[digest] = key.name

    @property
    def enabled(self) -> bool:
        return self.config is not None

    def label_of(self, digest: bytes) -> str:
        """The key's label in the metrics: its name, or a short hash; at most
        `max_metric_keys` of them, the rest `other`."""
        label = self._labels.get(digest)
        if label is None:
            if len(self._labels) >= self.config.max_metric_keys:
                return "other"
            label = self._labels[digest] = f"key-{digest.hex()[:8]}"
        return label

    async def admit(self, request: Request, image_steps: int) -> None:
        """Admit the request's job of `image_steps`, or raise its 429 (or 503)."""
        if self.config is None:
            return
        digest: bytes = request.state.api_key_digest
        named = self._named.get(digest)
        limits = named.over(self.config.default) if named else self.config.default
        label = self.label_of(digest)
        if limits.image_steps is not None and image_steps > limits.image_steps:
            self._count(label, "too_large", 0)
            raise self._too_large(image_steps, limits)
        key_id = digest.hex()[:32]
        slot_id = uuid.uuid4().hex if limits.concurrent_requests is not None else None
        try:
            counts = await self._store.admit(key_id, limits, image_steps, slot_id or "")
        except QuotaStoreError as error:
            self._store_failed("admit", error)
            if self.config.on_store_error == "closed":
                raise quota_store_unavailable() from None
            self._count(label, "unchecked", image_steps)
            return
        headers = limit_headers(limits, counts)
        if counts.refused is not None:
            self._count(label, counts.refused, 0)
            raise self._refusal(counts, limits, headers)
        self._count(label, "admitted", image_steps)
        request.scope["state"][ADMISSIONS].append(Admission(key_id, slot_id, headers))

    async def release(self, admission: Admission) -> None:
        if admission.slot_id is None:
            return
        try:
            await self._store.release(admission.key_id, admission.slot_id)
        except QuotaStoreError as error:
            self._store_failed("release", error)  # the slot expires after `slot_ttl_s`

    def _count(self, label: str, outcome: str, image_steps: int) -> None:
        if self._metrics is not None:
            self._metrics.key_request(label, outcome, image_steps)

    def _store_failed(self, operation: str, error: QuotaStoreError) -> None:
        if self._metrics is not None:
            self._metrics.quota_store_error(operation)
        now = time.monotonic()
        if now - self._last_warning >= WARNING_INTERVAL_S:
            self._last_warning = now
            logger.warning(
                "quota store unavailable (%s: %s); on_store_error=%s",
                operation,
                error,
                self.config.on_store_error,
            )

    def _window(self) -> str:
        return format_duration(round(self.config.window_s * 1000))

    def _too_large(self, image_steps: int, limits: KeyLimits):
        return rate_limited(
            f"This request needs {image_steps} image-steps (images x steps), more than this "
            f"key may use in {self._window()} ({limits.image_steps}). Ask for fewer images "
            "or steps.",
            kind="tokens",
            code="rate_limit_exceeded",
            retry_after_s=None,
            headers={},
        )

    def _refusal(self, counts: Counts, limits: KeyLimits, headers: dict[str, str]):
        if counts.refused == "concurrent_requests":
            message = (
                f"This key already has {counts.running} image requests running, its limit. "
                "Retry when one has finished."
            )
            return rate_limited(
                message,
                kind="requests",
                code="concurrency_limit_exceeded",
                retry_after_s=1,
                headers=headers,
            )
        limit, used, kind = (
            (limits.requests, counts.requests, "requests")
            if counts.refused == "requests"
            else (limits.image_steps, counts.image_steps, "tokens")
        )
        unit = "image requests" if kind == "requests" else "image-steps"
        wait = format_duration(counts.reset_ms)
        return rate_limited(
            f"Rate limit reached for {unit} of this key: {used} of {limit} used in "
            f"{self._window()}. Try again in {wait}.",
            kind=kind,
            code="rate_limit_exceeded",
            retry_after_s=max(1, math.ceil(counts.reset_ms / 1000)),
            headers={**headers, "retry-after-ms": str(max(counts.reset_ms, 1))},
        )


class QuotaSlots:
    """ASGI middleware: gives each request a place for its admissions, adds their
    `x-ratelimit-*` headers to its response, and releases their slots when it ends."""

    def __init__(self, app: ASGIApp, quotas: KeyQuotas) -> None:
        self.app = app
        self.quotas = quotas

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        admissions: list[Admission] = []
        scope.setdefault("state", {})[ADMISSIONS] = admissions

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start" and admissions:
                extra = [(k.encode(), v.encode()) for k, v in admissions[0].headers.items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            # Shielded: a request cancelled because its client left still frees its slot.
            with anyio.CancelScope(shield=True):
                for admission in admissions:
                    await self.quotas.release(admission)
