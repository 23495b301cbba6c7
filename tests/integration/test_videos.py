"""The Videos API through real Ray Serve, a real Redis and a real webhook receiver, with the
official `openai` client: a job is created, polled, downloaded, listed and deleted; its
webhook verifies with the client's own check; and the faults a durable job must survive
(its replica killed mid-job, stopped by a redeploy, Redis restarted under load) end every
job `completed` or `failed`, none lost and none finished twice. Last, the shipped
`config/local-videos.yaml` through `serve run`, as its header says to run it.

The suite runs this module in a process of its own beside the rest (README), so its Ray,
Redis and `serve run` overlap the other tiers rather than adding to them."""

from __future__ import annotations

import http.server
import io
import os
import signal
import threading
import time
from collections.abc import Iterator

import av
import httpx
import openai
import psutil
import pytest
from ray import serve

from deployments.config.video_config import video_deployment_name
from deployments.videos.webhook_delivery import new_webhook_secret
from serve_app import build_app
from tests.harness import REPO, ServeRun, free_port, load_config, with_overrides
from tests.redis_server import RedisServer

from .helpers import scrape_until, total

pytestmark = pytest.mark.integration

APP = "videos"
SECRET = new_webhook_secret()


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers 500 to the first try of each event."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, dict[str, str]]] = []
        self._seen: set[str] = set()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append((body, {k.lower(): v for k, v in self.headers.items()}))
                event_id = self.headers["webhook-id"]
                first = event_id not in receiver._seen
                receiver._seen.add(event_id)
                self.send_response(500 if first else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.port = free_port()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("video-redis"), persistent=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def app_args(redis_url: str, receiver_url: str, files: str, num_cpus: float = 0.5) -> dict:
    return {
        "models": [{"id": "tiny-sd3", "device": "cpu", "deployment": {"num_replicas": 1}}],
        "storage": {"directory": files},
        "videos": {
            "redis_url": redis_url,
            "models": [
                {
                    "id": "tiny-wan",
                    "source": "embedded:tiny-wan",
                    "seconds": [1, 2],
                    "fps": 8,
                    "default_steps": 3,
                    "max_steps": 2000,
                    "jobs_per_replica": 1,
                    "deployment": {
                        "num_replicas": 1,
                        "ray_actor_options": {
                            "num_cpus": num_cpus,
                            "runtime_env": {"env_vars": {"VIDEO_WEBHOOK_SECRET": SECRET}},
                        },
                    },
                }
            ],
            # A killed replica's job goes to its replacement within seconds, not an hour.
            "lease_s": 2,
            "redelivery_s": 8,
            "webhooks": [{"url": receiver_url, "secret_env": "VIDEO_WEBHOOK_SECRET"}],
        },
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("files"))


@pytest.fixture(scope="module")
def base_url(serve_url, redis_server, receiver, files) -> Iterator[str]:
    serve.run(
        build_app(app_args(redis_server.url, receiver.url, files)),
        name=APP,
        route_prefix=f"/{APP}",
    )
    yield f"{serve_url}/{APP}"
    serve.delete(APP)


@pytest.fixture
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", webhook_secret=SECRET)


def create(client: openai.OpenAI, **extensions) -> str:
    video = client.videos.create(
        model="tiny-wan", prompt="a fox in the snow", seconds="1", size="32x32",
        extra_body=extensions,
    )  # fmt: skip
    assert video.status == "queued" and video.progress == 0
    return video.id


def wait_for_end(client: openai.OpenAI, video_id: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            video = client.videos.retrieve(video_id)
        except openai.InternalServerError:  # 503 while Redis restarts: asked again
            time.sleep(0.5)
            continue
        if video.status in ("completed", "failed"):
            return video
        time.sleep(0.2)
    raise AssertionError(f"{video_id} still {video.status} after {timeout_s} s")


def test_the_official_client_creates_polls_downloads_lists_and_deletes(client):
    video = client.videos.create_and_poll(
        model="tiny-wan", prompt="a fox in the snow", seconds="1", size="32x32",
        extra_body={"seed": 3}, poll_interval_ms=200,
    )  # fmt: skip
    assert (video.status, video.progress, video.seconds, video.size) == (
        "completed", 100, "1", "32x32",
    )  # fmt: skip
    assert video.expires_at > video.completed_at >= video.created_at
    clip = client.videos.download_content(video.id).read()
    with av.open(io.BytesIO(clip)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(video=0))
        assert stream.codec_context.name == "h264" and stream.average_rate == 8
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (32, 32)
    thumbnail = client.videos.download_content(video.id, variant="thumbnail").read()
    assert thumbnail[:4] == b"RIFF" and thumbnail[8:12] == b"WEBP"

    newer = create(client, seed=4)
    page = client.videos.list(limit=1)
    assert [item.id for item in page.data] == [newer] and page.has_more
    assert client.videos.list(limit=1, after=newer).data[0].id == video.id
    wait_for_end(client, newer)

    assert client.videos.delete(video.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_bad_requests_are_refused_at_once_naming_the_parameter(client, base_url):
    cases = [
        ({"seconds": "3"}, "seconds"),
        ({"size": "30x30"}, "size"),
        ({"num_inference_steps": "0"}, "num_inference_steps"),
        ({"num_frames": "6"}, "num_frames"),
        ({"colour": "red"}, "colour"),
    ]
    for fields, param in cases:
        answer = httpx.post(
            f"{base_url}/v1/videos",
            data={"prompt": "x", "model": "tiny-wan", **fields},
        )
        assert answer.status_code == 400, (fields, answer.text)
        assert answer.json()["error"]["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.videos.create(model="no-such-model", prompt="x")
    unfinished = create(client, num_inference_steps=200)
    answer = httpx.get(f"{base_url}/v1/videos/{unfinished}/content")
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "video_not_ready"
    client.videos.delete(unfinished)


def test_the_webhook_is_signed_as_openai_signs_and_retried_until_delivered(client, receiver):
    video_id = create(client)
    assert wait_for_end(client, video_id).status == "completed"

    def tries() -> list[tuple[bytes, dict[str, str]]]:
        return [request for request in receiver.requests if video_id.encode() in request[0]]

    deadline = time.monotonic() + 30
    while len(tries()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # no third try follows the delivery
    assert len(tries()) == 2  # the 500, then the delivery
    (failed, delivered) = tries()
    assert failed[1]["webhook-id"] == delivered[1]["webhook-id"]
    event = client.webhooks.unwrap(delivered[0], delivered[1])
    assert (event.type, event.data.id) == ("video.completed", video_id)


def test_deleting_a_running_job_frees_its_replica_for_the_next(client):
    long = create(client, num_inference_steps=2000)
    deadline = time.monotonic() + 60
    while client.videos.retrieve(long).status != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.videos.delete(long)
    # One replica, one job at a time: the next job runs only once the deleted one stopped.
    started = time.monotonic()
    assert wait_for_end(client, create(client)).status == "completed"
    assert time.monotonic() - started < 15


def _video_replica_pids() -> list[int]:
    name = f"ServeReplica:{APP}:{video_deployment_name('tiny-wan')}"
    return [
        process.pid
        for process in psutil.process_iter(["cmdline"])
        if any(name in part for part in (process.info["cmdline"] or []))
    ]


def test_a_job_whose_replica_is_killed_runs_again_and_completes_once(client, redis_server):
    video_id = create(client, num_inference_steps=150)
    deadline = time.monotonic() + 60
    while client.videos.retrieve(video_id).progress < 5:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (pid,) = _video_replica_pids()
    os.kill(pid, signal.SIGKILL)
    video = wait_for_end(client, video_id, timeout_s=180)
    assert video.status == "completed", video.error
    assert client.videos.download_content(video_id).read()[4:8] == b"ftyp"
    assert attempts(redis_server, video_id) == 2  # the killed run, and the one that finished


def attempts(redis_server: RedisServer, video_id: str) -> int:
    with redis_server.client() as plain:
        return int(plain.hget(f"image-service:video:job:{video_id}", "attempts"))


def test_no_accepted_job_is_lost_when_redis_restarts(client, redis_server):
    ids = [create(client, seed=seed) for seed in range(4)]
    redis_server.restart(down_s=1.0)
    ended = [wait_for_end(client, video_id, timeout_s=180) for video_id in ids]
    assert [video.status for video in ended] == ["completed"] * 4


def test_a_replica_stopped_by_a_redeploy_hands_its_job_back(client, redis_server, receiver, files):
    """Serve stops a replica gracefully (a redeploy, a scale-down): its run stops at the next
    step and its job goes back to the queue, uncounted, and the new replica starts it at
    once; it is not left to a kill and `redelivery_s`."""
    video_id = create(client, num_inference_steps=2000)  # a minute or more: still running
    deadline = time.monotonic() + 60
    while client.videos.retrieve(video_id).progress < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    _, first_start = times(redis_server, video_id)
    # New actor options: Serve replaces the replica (the new one first, then the old stops).
    serve.run(
        build_app(app_args(redis_server.url, receiver.url, files, num_cpus=0.4)),
        name=APP,
        route_prefix=f"/{APP}",
    )
    deadline = time.monotonic() + 90
    while times(redis_server, video_id)[1] == first_start:
        assert time.monotonic() < deadline, "the job was not started again"
        time.sleep(0.2)
    assert attempts(redis_server, video_id) == 1  # handed back: the stopped run not counted
    client.videos.delete(video_id)


def times(redis_server: RedisServer, video_id: str) -> tuple[str, str]:
    with redis_server.client() as plain:
        return tuple(plain.hmget(f"image-service:video:job:{video_id}", "queued_at", "started_at"))


def test_jobs_and_webhook_deliveries_are_in_the_metrics(client):
    """Earlier tests completed jobs and retried a webhook; Ray exports what the replicas
    recorded on its Prometheus endpoint."""

    def recorded(samples) -> bool:
        return (
            total(samples, "ray_video_generation_jobs_total", model="tiny-wan", outcome="completed")
            >= 1
            and total(samples, "ray_video_generation_queue_wait_seconds_count", model="tiny-wan")
            >= 1
            and total(samples, "ray_video_generation_job_seconds_count", model="tiny-wan") >= 1
            and total(samples, "ray_video_generation_webhook_deliveries_total", outcome="delivered")
            >= 1
            and total(samples, "ray_video_generation_webhook_deliveries_total", outcome="retrying")
            >= 1
        )

    assert recorded(scrape_until(recorded))


def test_the_playground_makes_a_video_and_plays_it(base_url):
    """In a real headless Chromium: the page shows its video form only where the service
    serves videos, makes a job, follows its progress and plays the MP4 it fetched."""
    from playwright.sync_api import sync_playwright

    from .test_playground import CHROMIUM_ARGS, chromium_path

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"{base_url}/")
        page.wait_for_selector("#videos:not([hidden])")
        page.fill("#video_prompt", "a fox in the snow")
        page.fill("#video_seconds", "1")
        page.fill("#video_size", "32x32")
        page.click("#make-video")
        page.wait_for_function(
            "(() => { const v = document.getElementById('video-player');"
            " return !v.hidden && v.readyState >= 1; })()",
            timeout=120_000,
        )
        assert page.evaluate("document.getElementById('video-player').videoWidth") == 32
        assert "completed" in page.inner_text("#video-status")
        assert page.is_hidden("#video-error")
        browser.close()


def test_serve_run_video_config_serves_videos_to_the_official_client(tmp_path):
    """`config/local-videos.yaml` as its header says to run it: a Redis, its URL in the
    environment, `serve run`; the official client makes and downloads a clip."""
    redis_server = RedisServer(tmp_path, persistent=True)
    redis_server.start()
    config = with_overrides(
        load_config(REPO / "config" / "local-videos.yaml"),
        port=free_port(),
        args={"storage": {"directory": str(tmp_path / "files")}},
    )
    env = {"IMAGE_SERVICE_VIDEO_REDIS_URL": redis_server.url}
    try:
        with ServeRun(config, env=env) as server:
            server.wait_for_first_image(timeout_s=240)
            client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
            video = client.videos.create_and_poll(
                model="tiny-wan", prompt="a fox", seconds="1", poll_interval_ms=200, timeout=60
            )
            assert video.status == "completed", video.error
            clip = client.videos.download_content(video.id).read()
            with av.open(io.BytesIO(clip)) as container:
                stream = container.streams.video[0]
                assert (stream.codec_context.name, stream.width, stream.height) == (
                    "h264",
                    64,
                    64,
                )
                # One second at Wan's 16 frames per second, as Wan's 4k + 1 frames.
                assert len(list(container.decode(video=0))) == 17
    finally:
        redis_server.stop()
