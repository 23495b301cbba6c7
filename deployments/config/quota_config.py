"""Per-key quotas (`args.auth.quotas`): rate limits and concurrency limits of each API key,
counted in Redis so that every ingress replica sees the same counts.

Shared by both sides like the rest of the args; only the ingress acts on it (see
`deployments/ingress/quotas.py`). Off unless `auth.quotas` is set, and then it needs API keys.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from deployments.config.base import Strict

REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_redis_url(url: str) -> str:
    """`url` if redis-py can take it; a ValueError that says what is wrong otherwise (the
    message never repeats the URL, which may hold a password)."""
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError(
            "a Redis URL must start with redis://, rediss:// or unix:// "
            "(redis://HOST:PORT/DB, e.g. redis://localhost:6379/0)"
        )
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ValueError("a Redis URL needs a host (redis://HOST:PORT/DB)")
        try:
            parts.port  # noqa: B018 (urllib checks the port when it is read)
        except ValueError:
            raise ValueError("a Redis URL's port must be a number from 0 to 65535") from None
    return url


class KeyLimits(Strict):
    """The limits of one key; an unset one is no limit (or, for a named key, the default's)."""

    requests: int | None = Field(
        default=None, ge=1, description="Image requests (generations and edits) per window."
    )
    image_steps: int | None = Field(
        default=None,
        ge=1,
        description="Image-steps per window: each request costs its `usage.output_tokens` "
        "(images x denoising steps run), charged when it is admitted.",
    )
    concurrent_requests: int | None = Field(
        default=None, ge=1, description="Image requests of the key running at once."
    )

    def over(self, default: KeyLimits) -> KeyLimits:
        """These limits, with `default`'s in place of the unset ones."""
        return KeyLimits(
            requests=self.requests or default.requests,
            image_steps=self.image_steps or default.image_steps,
            concurrent_requests=self.concurrent_requests or default.concurrent_requests,
        )


class NamedKey(KeyLimits):
    """A key with a name (its label in the metrics) and limits of its own."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="The key's name in the metrics and logs (never the key itself).",
    )
    key_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description='SHA-256 of the key, in hex (`printf %s "$KEY" | sha256sum`): the '
        "config names a key without holding it.",
    )


class QuotaConfig(Strict):
    """Limits per API key, and the Redis that holds the counts."""

    window_s: float = Field(
        default=60.0,
        ge=0.1,
        description="Length of the fixed window the `requests` and `image_steps` limits count "
        "in (a key's window starts at its first request, and its counts reset when it ends).",
    )
    default: KeyLimits = Field(
        default_factory=KeyLimits, description="Limits of every key not listed in `keys`."
    )
    keys: list[NamedKey] = Field(
        default_factory=list, description="Keys with a name and limits of their own."
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis to count in (`redis://host:6379/0`, `rediss://...`, "
        "`unix:///path`); or give `redis_url_env`.",
    )
    redis_url_env: str | None = Field(
        default=None, description="Name of an environment variable holding the Redis URL."
    )
    redis_password_env: str | None = Field(
        default=None, description="Name of an environment variable holding Redis's password."
    )
    on_store_error: Literal["open", "closed"] = Field(
        default="closed",
        description="When Redis cannot be reached: `closed` answers 503 "
        "`quota_store_unavailable` (retryable); `open` admits the request uncounted, logs "
        "and counts it in `image_generation_quota_store_errors`.",
    )
    store_timeout_s: float = Field(
        default=0.5, gt=0, description="Seconds one Redis command may take before it fails."
    )
    slot_ttl_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds a concurrency slot lives if its ingress dies before releasing "
        "it; default `request_timeout_s` + 60.",
    )
    key_prefix: str = Field(
        default="image-service:quota:", description="Prefix of this service's Redis keys."
    )
    max_metric_keys: int = Field(
        default=100,
        ge=1,
        description="Most distinct `key` labels in the metrics: named keys by name, others as "
        "`key-` and 8 hex digits of their SHA-256; past the cap, `other`.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        return None if value is None else check_redis_url(value)

    @model_validator(mode="after")
    def _one_redis_and_distinct_keys(self) -> QuotaConfig:
        if (self.redis_url is None) == (self.redis_url_env is None):
            raise ValueError("auth.quotas needs exactly one of redis_url and redis_url_env")
        names = [key.name for key in self.keys]
        digests = [key.key_sha256 for key in self.keys]
        if len(set(names)) != len(names) or len(set(digests)) != len(digests):
            raise ValueError("auth.quotas.keys: two keys have the same name or key_sha256")
        return self
