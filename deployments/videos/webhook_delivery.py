"""Signed webhooks for video jobs, delivered in the background the way OpenAI delivers its own.

Each event is OpenAI's webhook event shape (`{"id": "evt_...", "object": "event",
"created_at": ..., "type": "video.completed", "data": {"id": "video_..."}}`), POSTed as JSON
and signed per Standard Webhooks: `webhook-id` (the event id), `webhook-timestamp` (unix
seconds) and `webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`) under a
`whsec_...` secret. A receiver verifies it with the `openai` client
(`client.webhooks.unwrap(body, headers)`) or any Standard Webhooks library.

Delivery policy (what a receiver sees):

- Retries: any answer that is not 2xx (redirects are not followed: a signed POST is not
  replayed to another address), a connection error or a timeout is tried again, up to
  `max_attempts` tries in all, after `first_backoff_s` doubling up to `max_backoff_s` (less up
  to 20% jitter, so receivers that come back are not hit by every sender at once; a
  `Retry-After` of 429/503 is honoured up to `max_backoff_s`). Every non-2xx is retried, as
  Standard Webhooks and OpenAI do: a 404 or 401 is as often a receiver mid-deploy as a wrong
  URL, and a few more tries of a wrong URL cost little.
- The same event keeps its `webhook-id` on every try, so a receiver can drop duplicates; its
  timestamp and signature are fresh on each try, so a late retry is not refused as too old.
- Isolation: each endpoint has its own thread and queue, so an endpoint that is down or slow
  delays no other endpoint. Within one endpoint, one request is in flight at a time (a slow
  receiver costs one thread and one connection, not one per event), and a try waiting out its
  backoff does not hold back the events behind it: the queue is ordered by when each try is
  due. Order between events is therefore not guaranteed (as with OpenAI's webhooks; the event
  carries `created_at`).
- Memory: each endpoint holds at most `max_pending` undelivered events. When a new event
  finds it full, the oldest pending event is dropped: a full queue means the receiver has been
  failing for a while, so the oldest event has spent the most of its tries and is the least
  likely to get through, while the new one has all of its tries ahead.
- Every event gets, per endpoint, exactly one report with `final=True` through `on_attempt`:
  delivered, out of tries, or dropped (queue full, or still waiting when `close()` gave up).
- Logs carry the event id and the URL without its query or credentials; never the secret.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import logging
import random
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.client import HTTPException
from typing import Any
from urllib.parse import urlsplit

from standardwebhooks.webhooks import Webhook

logger = logging.getLogger(__name__)

USER_AGENT = "image-service-webhooks/1"


@dataclass(frozen=True)
class WebhookEndpoint:
    """Where events go, and the secret they are signed with (`whsec_` + base64)."""

    url: str
    # Kept out of repr so that logging an endpoint never leaks its secret.
    secret: str = field(repr=False)


@dataclass(frozen=True)
class DeliveryAttempt:
    """What one try of one event to one endpoint came to, for metrics and logs.

    `status` is the HTTP status, or None for a connection error, a timeout, or a drop.
    `final`: no more tries follow (delivered, out of tries, or dropped). A dropped event (its
    endpoint's queue was full, or `close()` gave up on it) reports `dropped=True` with the
    number of tries it had made as `attempt` (0 if none) and `seconds` 0.
    """

    event_id: str
    event_type: str
    url: str
    attempt: int
    status: int | None
    delivered: bool
    final: bool
    seconds: float
    dropped: bool = False


def new_webhook_secret() -> str:
    """A fresh signing secret: `whsec_` and 32 random bytes in base64, as OpenAI issues."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _check_endpoint(endpoint: WebhookEndpoint) -> None:
    """Refuses, at start-up, an endpoint whose webhooks no receiver could verify. Libraries
    read a secret without `whsec_` differently (Standard Webhooks decodes it as base64, the
    openai client signs with its raw bytes), and the openai client wants padded base64."""
    where = _loggable(endpoint.url)
    if urlsplit(endpoint.url).scheme not in ("http", "https"):
        raise ValueError(f"webhook URL must be http(s): {where}")
    key = endpoint.secret.removeprefix("whsec_")
    try:
        valid = endpoint.secret.startswith("whsec_") and bool(base64.b64decode(key, validate=True))
    except ValueError:  # binascii.Error is one
        valid = False
    if not valid:
        # The secret itself stays out of the message: it may end up in a log.
        raise ValueError(f"the secret of webhook {where} is not 'whsec_' and padded base64")


def _loggable(url: str) -> str:
    """`url` without credentials or query: receivers sometimes put a token in either."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx is an answer like any other non-2xx: urllib would otherwise turn the POST into a
    body-less GET (301-303), or replay the signed body to an address nobody configured."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


@dataclass
class _Delivery:
    """One event on its way to one endpoint."""

    event_id: str
    event_type: str
    body: bytes
    # Order of arrival at the endpoint's queue: which pending event is the oldest.
    arrival: int
    attempts: int = 0


@dataclass(frozen=True)
class _Policy:
    max_attempts: int
    first_backoff_s: float
    max_backoff_s: float
    timeout_s: float
    max_pending: int

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        """Seconds to wait after try number `attempts` failed."""
        delay = min(self.max_backoff_s, self.first_backoff_s * 2 ** (attempts - 1))
        delay *= random.uniform(0.8, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        return delay


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    """A 429's or 503's `Retry-After` in seconds (the HTTP-date form is rare; ignored)."""
    if error.code not in (429, 503) or error.headers is None:
        return None
    value = error.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class _EndpointWorker:
    """One endpoint's queue and the thread that empties it, one request at a time."""

    def __init__(
        self,
        endpoint: WebhookEndpoint,
        policy: _Policy,
        report: Callable[[DeliveryAttempt], None],
    ) -> None:
        self.endpoint = endpoint
        self._signer = Webhook(endpoint.secret)
        self._policy = policy
        self._report = report
        self._where = _loggable(endpoint.url)
        self._condition = threading.Condition()
        # (when the next try is due, tie-breaker, delivery): a min-heap on the due time.
        self._due: list[tuple[float, int, _Delivery]] = []
        self._order = itertools.count()
        self._stop_at: float | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"webhooks {self._where}", daemon=True
        )
        self._thread.start()

    def put(self, event_id: str, event_type: str, body: bytes) -> None:
        """Queues one event; a drop it causes is reported here, in the sender's thread."""
        with self._condition:
            delivery = _Delivery(event_id, event_type, body, arrival=next(self._order))
            if self._stop_at is not None:
                dropped, why = [delivery], "the sender is closed"
            else:
                dropped, why = self._make_room(), "the queue is full"
                heapq.heappush(self._due, (time.monotonic(), next(self._order), delivery))
                self._condition.notify()
        # Outside the lock: on_attempt may be slow, or send again.
        for old in dropped:
            self._drop(old, why)

    def _make_room(self) -> list[_Delivery]:
        """Drops the oldest pending event if the queue is full (see the module's docstring
        for why the oldest); the caller holds the lock and reports the drop outside it."""
        if len(self._due) < self._policy.max_pending:
            return []
        oldest = min(range(len(self._due)), key=lambda index: self._due[index][2].arrival)
        _, _, delivery = self._due.pop(oldest)
        heapq.heapify(self._due)
        return [delivery]

    def stop(self, stop_at: float) -> None:
        """Tries due before `stop_at` still go out; the rest are dropped when it comes."""
        with self._condition:
            if self._stop_at is None:
                self._stop_at = stop_at
            self._condition.notify()

    def join(self, timeout_s: float) -> None:
        self._thread.join(max(0.0, timeout_s))

    def _run(self) -> None:
        while (delivery := self._next()) is not None:
            try:
                self._attempt(delivery)
            except Exception:
                # A bug here must not end the endpoint's thread and strand its queue.
                logger.exception(
                    "webhook %s to %s: unexpected error", delivery.event_id, self._where
                )

    def _next(self) -> _Delivery | None:
        """The next delivery whose try is due, waiting for it; None once stopped."""
        with self._condition:
            while True:
                now = time.monotonic()
                if self._stop_at is not None and (
                    now >= self._stop_at or not self._due or self._due[0][0] > self._stop_at
                ):
                    abandoned = [delivery for _, _, delivery in self._due]
                    self._due.clear()
                    break
                if self._due and self._due[0][0] <= now:
                    return heapq.heappop(self._due)[2]
                self._condition.wait(self._due[0][0] - now if self._due else None)
        for delivery in abandoned:
            self._drop(delivery, "the sender closed before its next try")
        return None

    def _attempt(self, delivery: _Delivery) -> None:
        delivery.attempts += 1
        started = time.monotonic()
        status, retry_after = self._post(delivery)
        seconds = time.monotonic() - started
        delivered = status is not None and 200 <= status < 300
        final = delivered or delivery.attempts >= self._policy.max_attempts
        if not final:
            delay = self._policy.backoff(delivery.attempts, retry_after)
            with self._condition:
                heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), delivery))
                self._condition.notify()
        if delivered:
            logger.info(
                "webhook %s (%s) delivered to %s on try %d",
                delivery.event_id,
                delivery.event_type,
                self._where,
                delivery.attempts,
            )
        elif final:
            logger.error(
                "webhook %s (%s) to %s failed after %d tries; last status %s",
                delivery.event_id,
                delivery.event_type,
                self._where,
                delivery.attempts,
                status,
            )
        self._report_try(delivery, status, delivered, final, seconds)

    def _post(self, delivery: _Delivery) -> tuple[int | None, float | None]:
        """One signed POST: its HTTP status (None if none came) and any Retry-After."""
        # Signed afresh on each try: receivers refuse timestamps older than 5 minutes.
        timestamp = int(time.time())
        signature = self._signer.sign(
            delivery.event_id, datetime.fromtimestamp(timestamp, tz=UTC), delivery.body
        )
        request = urllib.request.Request(
            self.endpoint.url,
            data=delivery.body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                "webhook-id": delivery.event_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": signature,
            },
        )
        try:
            with _OPENER.open(request, timeout=self._policy.timeout_s) as response:
                return response.status, None
        except urllib.error.HTTPError as error:
            error.close()
            why = f"status {error.code}"
            status, retry_after = error.code, _retry_after(error)
        except (urllib.error.URLError, HTTPException, OSError) as error:
            # URLError wraps refusals and DNS failures; a read timeout surfaces as
            # TimeoutError, a receiver hanging up mid-answer as an HTTPException.
            why = str(getattr(error, "reason", None) or error) or type(error).__name__
            status, retry_after = None, None
        logger.warning(
            "webhook %s to %s: try %d of %d failed: %s",
            delivery.event_id,
            self._where,
            delivery.attempts,
            self._policy.max_attempts,
            why,
        )
        return status, retry_after

    def _drop(self, delivery: _Delivery, why: str) -> None:
        logger.error(
            "webhook %s (%s) to %s dropped after %d tries: %s",
            delivery.event_id,
            delivery.event_type,
            self._where,
            delivery.attempts,
            why,
        )
        self._report_try(delivery, None, False, True, 0.0, dropped=True)

    def _report_try(
        self,
        delivery: _Delivery,
        status: int | None,
        delivered: bool,
        final: bool,
        seconds: float,
        dropped: bool = False,
    ) -> None:
        self._report(
            DeliveryAttempt(
                event_id=delivery.event_id,
                event_type=delivery.event_type,
                url=self.endpoint.url,
                attempt=delivery.attempts,
                status=status,
                delivered=delivered,
                final=final,
                seconds=seconds,
                dropped=dropped,
            )
        )


class WebhookSender:
    """Signs events and delivers them to every endpoint in the background.

    `send()` is safe from any thread (a Celery worker thread, an asyncio loop) and never waits
    on the network: it queues the event on each endpoint's thread and returns its id.
    `on_attempt` hears of every try, from those threads (of a drop, from the thread that
    caused it): keep it quick, as a slow one delays its endpoint's deliveries; an exception
    from it is logged and ignored.
    """

    def __init__(
        self,
        endpoints: Sequence[WebhookEndpoint],
        *,
        max_attempts: int = 6,
        first_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        timeout_s: float = 10.0,
        on_attempt: Callable[[DeliveryAttempt], None] | None = None,
        max_pending: int = 1000,
    ) -> None:
        if max_attempts < 1 or max_pending < 1:
            raise ValueError("max_attempts and max_pending must be at least 1")
        if first_backoff_s < 0 or max_backoff_s < 0 or timeout_s <= 0:
            raise ValueError("backoffs must be >= 0 and timeout_s > 0")
        for endpoint in endpoints:
            _check_endpoint(endpoint)
        self._on_attempt = on_attempt
        policy = _Policy(max_attempts, first_backoff_s, max_backoff_s, timeout_s, max_pending)
        # The same endpoint listed twice would deliver every event twice; once is meant.
        self._workers = [
            _EndpointWorker(endpoint, policy, self._report) for endpoint in dict.fromkeys(endpoints)
        ]

    def send(self, event_type: str, data: dict[str, Any]) -> str:
        """Queues `event_type` with `data` for every endpoint; the event's id ("evt_...").

        The body is built here, so data that is not JSON fails in the caller (TypeError)
        rather than in the background."""
        event_id = "evt_" + secrets.token_hex(16)
        event = {
            "id": event_id,
            "object": "event",
            "created_at": int(time.time()),
            "type": event_type,
            "data": data,
        }
        body = json.dumps(event, separators=(",", ":")).encode()
        for worker in self._workers:
            worker.put(event_id, event_type, body)
        return event_id

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops: tries due within `timeout_s` still go out (waited for, up to then); events
        still waiting for a later try are dropped, each with a final report. Events sent
        after this are dropped at once."""
        stop_at = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.stop(stop_at)
        for worker in self._workers:
            # A request in flight past the deadline finishes on its own (daemon thread).
            worker.join(stop_at - time.monotonic())

    def _report(self, attempt: DeliveryAttempt) -> None:
        if self._on_attempt is None:
            return
        try:
            self._on_attempt(attempt)
        except Exception:
            logger.exception(
                "webhook %s to %s: on_attempt failed", attempt.event_id, _loggable(attempt.url)
            )
