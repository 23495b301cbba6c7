"""The counts behind the per-key quotas, in Redis, shared by every ingress replica.

One Lua script decides and counts a request atomically (Redis runs a script alone), so two
replicas admitting the same key at once never both take its last request:
- a key's `requests` and `image_steps` are counted in a fixed window: a hash that expires
  `window_s` after the key's first request in it (its time to live is the limits' reset).
  Redis's clock alone decides, so the replicas' clocks do not matter;
- its running requests are members of a sorted set, scored by when each expires: a slot is
  removed when its request ends, and one whose ingress died is dropped once its time is up.
A refused request counts nothing. Both keys of a key share a hash tag, as Redis Cluster needs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from deployments.config.quota_config import KeyLimits

# KEYS: the window's hash, the slots' sorted set. ARGV: window ms, requests limit, image-steps
# limit, the request's image-steps, concurrency limit (-1: none), slot id, slot ttl ms.
# Returns the limit that refused it ("" if admitted), requests and image-steps used in the
# window (the request's included if admitted), ms until the window resets, running requests.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window_ms, request_limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local step_limit, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local slot_limit, slot_ttl_ms = tonumber(ARGV[5]), tonumber(ARGV[7])
local reset = redis.call('PTTL', KEYS[1])
local fresh = reset < 0
if fresh then
  redis.call('DEL', KEYS[1])
  reset = window_ms
end
local used = redis.call('HMGET', KEYS[1], 'requests', 'image_steps')
local requests, steps = tonumber(used[1] or '0'), tonumber(used[2] or '0')
local running = 0
if slot_limit >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  running = redis.call('ZCARD', KEYS[2])
end
local refused = ''
if request_limit >= 0 and requests + 1 > request_limit then
  refused = 'requests'
elseif step_limit >= 0 and steps + cost > step_limit then
  refused = 'image_steps'
elseif slot_limit >= 0 and running + 1 > slot_limit then
  refused = 'concurrent_requests'
end
if refused == '' then
  requests = redis.call('HINCRBY', KEYS[1], 'requests', 1)
  steps = redis.call('HINCRBY', KEYS[1], 'image_steps', cost)
  if fresh then redis.call('PEXPIRE', KEYS[1], window_ms) end
  if slot_limit >= 0 then
    redis.call('ZADD', KEYS[2], now + slot_ttl_ms, ARGV[6])
    redis.call('PEXPIRE', KEYS[2], slot_ttl_ms)
    running = running + 1
  end
end
return {refused, requests, steps, reset, running}
"""


class QuotaStoreError(Exception):
    """Redis could not be reached, or failed a command."""


@dataclass(frozen=True)
class Counts:
    """A key's counts as one admission left them."""

    refused: str | None  # the limit that refused the request: a `KeyLimits` field name
    requests: int
    image_steps: int
    reset_ms: int
    running: int


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class RedisQuotaStore:
    def __init__(
        self,
        url: str,
        password: str | None,
        *,
        timeout_s: float,
        prefix: str,
        window_s: float,
        slot_ttl_s: float,
    ) -> None:
        parse_url(url)  # a malformed URL (a port that is no number, say) fails at start
        self._url = url
        self._password = password
        self._timeout_s = timeout_s
        self._prefix = prefix
        self._window_ms = round(window_s * 1000)
        self._slot_ttl_ms = round(slot_ttl_s * 1000)
        self._client: Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _redis(self) -> Redis:
        # A client's connections belong to the event loop that made them: one per loop (a
        # replica has one; an in-process test client may start several).
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = Redis.from_url(
                self._url,
                password=self._password,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
                # One immediate retry: a pooled connection that a Redis restart broke fails
                # once, and the retry opens a new one. No backoff: a decision must be quick.
                retry=Retry(NoBackoff(), 1),
            )
            self._admit = self._client.register_script(_ADMIT)
            self._loop = loop
        return self._client

    def _keys(self, key_id: str) -> tuple[str, str]:
        base = f"{self._prefix}{{{key_id}}}"
        return f"{base}:window", f"{base}:slots"

    async def admit(self, key_id: str, limits: KeyLimits, cost: int, slot_id: str) -> Counts:
        """Admit one request of `cost` image-steps, taking slot `slot_id` if the key has a
        concurrency limit; or say which limit refuses it."""
        self._redis()
        args = [
            self._window_ms,
            _limit(limits.requests),
            _limit(limits.image_steps),
            cost,
            _limit(limits.concurrent_requests),
            slot_id,
            self._slot_ttl_ms,
        ]
        try:
            refused, requests, steps, reset_ms, running = await self._admit(
                keys=list(self._keys(key_id)), args=args
            )
        except (RedisError, OSError) as error:
            raise QuotaStoreError(type(error).__name__) from error
        return Counts(refused.decode() or None, requests, steps, reset_ms, running)

    async def release(self, key_id: str, slot_id: str) -> None:
        try:
            await self._redis().zrem(self._keys(key_id)[1], slot_id)
        except (RedisError, OSError) as error:
            raise QuotaStoreError(type(error).__name__) from error
