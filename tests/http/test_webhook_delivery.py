"""Video webhooks as a receiver sees them: real HTTP to a server on 127.0.0.1, verified with
the official `openai` client and the Standard Webhooks library; retries, isolation between
endpoints, and the bounded queue."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from deployments.videos.webhook_delivery import (
    DeliveryAttempt,
    WebhookEndpoint,
    WebhookSender,
    new_webhook_secret,
)
from tests.harness import free_port

# Small backoffs so that a run of retries takes a fraction of a second.
FAST = {"first_backoff_s": 0.05, "max_backoff_s": 0.2}


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """A webhook receiver on 127.0.0.1: answers each request with the next of `statuses`
    (the last one from then on), after `delay_s`, and keeps what it received."""

    def __init__(self, statuses: tuple[int, ...] = (200,), delay_s: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.delay_s = delay_s
        self.received: list[Received] = []
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._arrived:
                    receiver.received.append(
                        # Lower-cased, as web frameworks hand headers to a handler.
                        Received(
                            {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()
                        )
                    )
                    statuses = receiver.statuses
                    status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
                    receiver._arrived.notify_all()
                time.sleep(receiver.delay_s)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        # Port 0: the system picks a free one, with no window for another process to take it.
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def wait_for(self, count: int, timeout_s: float = 5.0) -> list[Received]:
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.received) >= count, timeout_s)
            return list(self.received)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Reports:
    """What `on_attempt` heard, and a wait for an event's final report."""

    def __init__(self) -> None:
        self.attempts: list[DeliveryAttempt] = []
        self._changed = threading.Condition()

    def __call__(self, attempt: DeliveryAttempt) -> None:
        with self._changed:
            self.attempts.append(attempt)
            self._changed.notify_all()

    def final(self, event_id: str, url: str, timeout_s: float = 5.0) -> DeliveryAttempt:
        def found() -> DeliveryAttempt | None:
            return next(
                (a for a in self.attempts if a.event_id == event_id and a.url == url and a.final),
                None,
            )

        with self._changed:
            assert self._changed.wait_for(found, timeout_s), f"no final report in {timeout_s}s"
            return found()

    def of(self, event_id: str) -> list[DeliveryAttempt]:
        with self._changed:
            return [a for a in self.attempts if a.event_id == event_id]


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for receiver in started:
        receiver.stop()


@pytest.fixture
def senders() -> Iterator[list[WebhookSender]]:
    started: list[WebhookSender] = []
    yield started
    for sender in started:
        sender.close(timeout_s=0.5)


def test_a_delivered_webhook_verifies_with_the_openai_client(receivers, senders):
    receiver = Receiver()
    receivers.append(receiver)
    secret = new_webhook_secret()
    reports = Reports()
    sender = WebhookSender([WebhookEndpoint(receiver.url, secret)], on_attempt=reports)
    senders.append(sender)

    event_id = sender.send("video.completed", {"id": "video_123"})
    (request,) = receiver.wait_for(1)
    assert reports.final(event_id, receiver.url).delivered

    client = openai.OpenAI(api_key="x", webhook_secret=secret)
    event = client.webhooks.unwrap(request.body, request.headers)
    assert (event.id, event.object, event.type) == (event_id, "event", "video.completed")
    assert event.data.id == "video_123"
    assert abs(event.created_at - time.time()) < 60
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == event_id
    assert Webhook(secret).verify(request.body, request.headers) == json.loads(request.body)


def test_a_tampered_or_wrongly_keyed_webhook_fails_verification(receivers, senders):
    receiver = Receiver()
    receivers.append(receiver)
    secret = new_webhook_secret()
    sender = WebhookSender([WebhookEndpoint(receiver.url, secret)])
    senders.append(sender)

    sender.send("video.failed", {"id": "video_9"})
    (request,) = receiver.wait_for(1)
    tampered = request.body.replace(b"video_9", b"video_8")
    client = openai.OpenAI(api_key="x", webhook_secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(tampered, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, request.headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(request.body, request.headers, secret=new_webhook_secret())


def test_a_failed_try_is_retried_with_the_same_webhook_id(receivers, senders):
    receiver = Receiver(statuses=(500, 200))
    receivers.append(receiver)
    secret = new_webhook_secret()
    reports = Reports()
    sender = WebhookSender([WebhookEndpoint(receiver.url, secret)], on_attempt=reports, **FAST)
    senders.append(sender)

    event_id = sender.send("video.completed", {"id": "video_1"})
    assert reports.final(event_id, receiver.url).delivered
    first, second = receiver.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == event_id
    assert first.body == second.body
    # Each try is signed on its own, and both verify.
    for request in (first, second):
        Webhook(secret).verify(request.body, request.headers)
    attempts = [(a.attempt, a.status, a.delivered, a.final) for a in reports.of(event_id)]
    assert attempts == [(1, 500, False, False), (2, 200, True, True)]


def test_a_receiver_that_is_down_gets_max_attempts_tries_then_a_final_failure(senders):
    url = f"http://127.0.0.1:{free_port()}/hooks"  # nothing listens there
    reports = Reports()
    sender = WebhookSender(
        [WebhookEndpoint(url, new_webhook_secret())], max_attempts=3, on_attempt=reports, **FAST
    )
    senders.append(sender)

    event_id = sender.send("video.failed", {"id": "video_2"})
    last = reports.final(event_id, url)
    assert not last.delivered and not last.dropped
    attempts = [(a.attempt, a.status, a.delivered, a.final) for a in reports.of(event_id)]
    assert attempts == [(1, None, False, False), (2, None, False, False), (3, None, False, True)]


def test_a_receiver_that_keeps_failing_sees_exactly_max_attempts_tries(receivers, senders):
    receiver = Receiver(statuses=(503,))
    receivers.append(receiver)
    reports = Reports()
    sender = WebhookSender(
        [WebhookEndpoint(receiver.url, new_webhook_secret())],
        max_attempts=4,
        on_attempt=reports,
        **FAST,
    )
    senders.append(sender)

    event_id = sender.send("video.failed", {"id": "video_3"})
    assert reports.final(event_id, receiver.url).attempt == 4
    time.sleep(0.4)  # longer than any backoff: a fifth try would have come
    assert [r.headers["webhook-id"] for r in receiver.received] == [event_id] * 4


def test_a_slow_receiver_does_not_delay_another_endpoint(receivers, senders):
    slow, fast = Receiver(delay_s=2.0), Receiver()
    receivers.extend([slow, fast])
    reports = Reports()
    sender = WebhookSender(
        [
            WebhookEndpoint(slow.url, new_webhook_secret()),
            WebhookEndpoint(fast.url, new_webhook_secret()),
        ],
        on_attempt=reports,
    )
    senders.append(sender)

    sent_at = time.monotonic()
    first = sender.send("video.completed", {"id": "video_4"})
    slow.wait_for(1)  # the slow endpoint's thread is now stuck in its request
    second = sender.send("video.completed", {"id": "video_5"})
    assert reports.final(second, fast.url, timeout_s=0.5).delivered
    assert reports.final(first, fast.url, timeout_s=0.5).delivered
    assert fast.received[-1].at - sent_at < 0.5
    assert not any(a.url == slow.url for a in reports.attempts)  # still answering


def test_a_retry_waiting_out_its_backoff_does_not_hold_back_new_events(receivers, senders):
    receiver = Receiver(statuses=(500, 200))
    receivers.append(receiver)
    reports = Reports()
    sender = WebhookSender(
        [WebhookEndpoint(receiver.url, new_webhook_secret())],
        first_backoff_s=0.6,
        on_attempt=reports,
    )
    senders.append(sender)

    failing = sender.send("video.completed", {"id": "video_6"})
    receiver.wait_for(1)
    started = time.monotonic()
    later = sender.send("video.completed", {"id": "video_7"})
    assert reports.final(later, receiver.url, timeout_s=0.3).delivered
    assert time.monotonic() - started < 0.3
    assert reports.final(failing, receiver.url, timeout_s=3).attempt == 2


def test_a_full_queue_drops_the_oldest_event_with_a_final_report(receivers, senders):
    slow = Receiver(delay_s=0.3)
    receivers.append(slow)
    reports = Reports()
    sender = WebhookSender(
        [WebhookEndpoint(slow.url, new_webhook_secret())], max_pending=2, on_attempt=reports
    )
    senders.append(sender)

    in_flight = sender.send("video.completed", {"id": "video_a"})
    slow.wait_for(1)
    oldest, middle, newest = (sender.send("video.completed", {"id": n}) for n in "bcd")
    dropped = reports.final(oldest, slow.url, timeout_s=0.5)
    assert dropped.dropped and not dropped.delivered and dropped.attempt == 0
    for kept in (in_flight, middle, newest):
        assert reports.final(kept, slow.url, timeout_s=2).delivered
    assert [json.loads(r.body)["id"] for r in slow.received] == [in_flight, middle, newest]


def test_close_drops_what_waits_for_a_later_try_and_what_is_sent_after(receivers):
    receiver = Receiver(statuses=(500,))
    receivers.append(receiver)
    reports = Reports()
    sender = WebhookSender(
        [WebhookEndpoint(receiver.url, new_webhook_secret())],
        first_backoff_s=10.0,
        on_attempt=reports,
    )
    waiting = sender.send("video.completed", {"id": "video_w"})
    receiver.wait_for(1)
    started = time.monotonic()
    sender.close(timeout_s=1.0)
    assert time.monotonic() - started < 1.5
    assert reports.final(waiting, receiver.url, timeout_s=0.5).dropped
    late = sender.send("video.completed", {"id": "video_late"})
    assert reports.final(late, receiver.url, timeout_s=0.5).dropped
    assert len(receiver.received) == 1


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "whsec_",
        "c2VjcmV0LWtleS1vZi0zMi1ieXRlcy1sb25nISE=",  # no whsec_: libraries disagree on it
        "whsec_c2VjcmV0MQ",  # unpadded: the openai client cannot decode it
        "whsec_not base64!",
    ],
)
def test_a_secret_no_receiver_could_verify_with_is_refused_at_start(secret):
    with pytest.raises(ValueError, match="secret") as refused:
        WebhookSender([WebhookEndpoint("https://example.com/hooks?token=t", secret)])
    assert "token" not in str(refused.value)
    if secret.removeprefix("whsec_"):
        assert secret.removeprefix("whsec_") not in str(refused.value)


def test_the_secret_never_shows_in_an_endpoints_repr():
    secret = new_webhook_secret()
    assert secret not in repr(WebhookEndpoint("https://example.com/hooks", secret))
    assert secret.startswith("whsec_") and Webhook(secret)  # a valid Standard Webhooks key
