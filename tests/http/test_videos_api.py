"""The Videos API in-process over a real Redis, with no video worker (the jobs stay queued):
what the ingress alone decides. A job belongs to its key, the key's quotas count its frames
x steps, a bad form is a 400 naming the field, a deleted queued job leaves the queue with
nothing to run, and Redis down is a retryable 503."""

from __future__ import annotations

import io

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api
from deployments.ingress.deployment import video_service

from .quota_apps import QuotaCounts, bearer, quota_args

VIDEOS = "/v1/videos"


def video_args(args: AppArgs, redis_url: str, **videos) -> AppArgs:
    model = {"id": "tiny-wan", "seconds": [1, 2], "fps": 8, "default_steps": 3}
    config = {"redis_url": redis_url, "models": [model], **videos}
    return AppArgs.model_validate({**args.model_dump(), "videos": config})


def app_of(args: AppArgs, generator, store, metrics=None) -> TestClient:
    api = create_api(
        args,
        {"tiny-sd3": generator},
        store,
        quota_metrics=metrics,
        videos=video_service(args, store),
    )
    return TestClient(api, raise_server_exceptions=False)


@pytest.fixture
def client(args, generator, store, redis_server) -> TestClient:
    return app_of(video_args(args, redis_server.url), generator, store)


def png(width: int = 40, height: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_job_is_queued_and_answered_as_openai_answers(client, redis_server):
    answer = client.post(VIDEOS, data={"prompt": "a fox", "seconds": "2", "size": "32x32"})
    assert answer.status_code == 200, answer.text
    video = answer.json()
    assert list(video)[:8] == [
        "id", "object", "created_at", "status", "model", "progress", "seconds", "size",
    ]  # fmt: skip
    assert (video["object"], video["status"], video["model"]) == ("video", "queued", "tiny-wan")
    assert (video["seconds"], video["size"], video["progress"]) == ("2", "32x32", 0)
    again = client.get(f"{VIDEOS}/{video['id']}")
    assert again.json() == video and again.headers["openai-poll-after-ms"] == "500"
    # The job's id is on its model's queue, for a worker to take.
    with redis_server.client() as plain:
        (queued,) = plain.lrange("image-service:video:queue:tiny-wan", 0, -1)
    assert video["id"].encode() in queued


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"seconds": "3"}, "seconds"),
        ({"seconds": "1e9"}, "seconds"),
        ({"size": "99999x99999"}, "size"),
        ({"size": "big"}, "size"),
        ({"num_inference_steps": "0"}, "num_inference_steps"),
        ({"seed": "-1"}, "seed"),
        ({"quality": "hd"}, "quality"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_a_bad_form_is_a_400_naming_the_field(client, fields, param):
    answer = client.post(VIDEOS, data={"prompt": "a fox", **fields})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_an_unknown_model_is_a_404_and_a_json_body_a_400(client):
    assert client.post(VIDEOS, data={"prompt": "x", "model": "nope"}).status_code == 404
    answer = client.post(VIDEOS, json={"prompt": "x"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_body"


def test_the_models_published_limits_are_checked_at_once(client, redis_server):
    """Once a replica published its model's limits, a size off its multiple or a reference
    image for a text-only model is refused before anything is queued."""
    with redis_server.client() as plain:
        plain.set(
            "image-service:video:limits:tiny-wan",
            '{"size_multiple": 16, "frame_multiple": 4, "max_frames": 81, '
            '"image_to_video": false, "guidance": true}',
        )
    off = client.post(VIDEOS, data={"prompt": "x", "size": "40x40"})
    assert off.status_code == 400 and off.json()["error"]["param"] == "size"
    frames = client.post(VIDEOS, data={"prompt": "x", "num_frames": "6"})
    assert frames.json()["error"]["param"] == "num_frames"
    image = client.post(
        VIDEOS, data={"prompt": "x"}, files={"input_reference": ("a.png", png(), "image/png")}
    )
    assert image.status_code == 400 and image.json()["error"]["param"] == "input_reference"
    # An image-to-video model needs its image.
    with redis_server.client() as plain:
        plain.set(
            "image-service:video:limits:tiny-wan",
            '{"size_multiple": 16, "frame_multiple": 4, "max_frames": 81, '
            '"image_to_video": true, "guidance": true}',
        )
    missing = client.post(VIDEOS, data={"prompt": "x"})
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "missing_required_parameter"
    assert missing.json()["error"]["param"] == "input_reference"


def test_an_input_reference_is_stored_at_the_clips_size(client, store, redis_server):
    answer = client.post(
        VIDEOS,
        data={"prompt": "x", "size": "32x32"},
        files={"input_reference": ("a.png", png(), "image/png")},
    )
    assert answer.status_code == 200, answer.text
    (stored,) = list(store.directory.glob("*.png"))
    assert Image.open(stored).size == (32, 32)
    # Deleting the queued job deletes its reference too: nothing is left behind.
    assert client.delete(f"{VIDEOS}/{answer.json()['id']}").json()["deleted"] is True
    assert not list(store.directory.glob("*.png"))
    broken = client.post(
        VIDEOS, data={"prompt": "x"}, files={"input_reference": ("a.png", b"nope", "image/png")}
    )
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "input_reference"


def test_list_pages_newest_first_and_delete_removes(client):
    ids = [client.post(VIDEOS, data={"prompt": f"p{i}"}).json()["id"] for i in range(5)]
    first = client.get(VIDEOS, params={"limit": 2}).json()
    assert [item["id"] for item in first["data"]] == ids[::-1][:2] and first["has_more"]
    assert (first["first_id"], first["last_id"]) == (ids[4], ids[3])
    rest = client.get(VIDEOS, params={"limit": 10, "after": first["last_id"]}).json()
    assert [item["id"] for item in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
    stale = client.get(VIDEOS, params={"after": "video_none"})
    assert stale.status_code == 400 and stale.json()["error"]["param"] == "after"
    oldest = client.get(VIDEOS, params={"order": "asc", "limit": 1}).json()
    assert oldest["data"][0]["id"] == ids[0]
    assert client.delete(f"{VIDEOS}/{ids[0]}").json() == {
        "id": ids[0], "object": "video.deleted", "deleted": True,
    }  # fmt: skip
    assert client.get(f"{VIDEOS}/{ids[0]}").status_code == 404
    assert client.get(VIDEOS, params={"order": "asc", "limit": 1}).json()["data"][0]["id"] == ids[1]
    unfinished = client.get(f"{VIDEOS}/{ids[1]}/content")
    assert unfinished.status_code == 400 and unfinished.json()["error"]["code"] == "video_not_ready"
    assert client.get(f"{VIDEOS}/{ids[1]}/content", params={"variant": "x"}).status_code == 400


def test_a_job_is_its_keys_alone_and_its_frames_count_in_the_keys_quota(
    args, generator, store, redis_server, monkeypatch
):
    keyed = quota_args(
        video_args(args, redis_server.url),
        monkeypatch,
        redis_server.url,
        keys=[{"name": "alice", "image_steps": 60}],
    )
    metrics = QuotaCounts()
    client = app_of(keyed, generator, store, metrics)
    # 1 s at 8 fps is 9 frames (4k + 1), x 3 steps: 27 image-steps.
    mine = client.post(VIDEOS, data={"prompt": "x"}, headers=bearer("alice"))
    assert mine.status_code == 200, mine.text
    video_id = mine.json()["id"]
    assert client.get(f"{VIDEOS}/{video_id}", headers=bearer("bob")).status_code == 404
    assert client.delete(f"{VIDEOS}/{video_id}", headers=bearer("bob")).status_code == 404
    assert client.get(VIDEOS, headers=bearer("bob")).json()["data"] == []
    assert client.get(f"{VIDEOS}/{video_id}", headers=bearer("alice")).status_code == 200
    assert client.post(VIDEOS, data={"prompt": "x"}, headers=bearer("alice")).status_code == 200
    refused = client.post(VIDEOS, data={"prompt": "x"}, headers=bearer("alice"))
    assert refused.status_code == 429  # 27 + 27 + 27 > 60
    assert metrics.image_steps["alice"] == 54
    assert client.post(VIDEOS, data={"prompt": "x"}).status_code == 401


def test_redis_down_is_a_retryable_503(args, generator, store, own_redis):
    client = app_of(video_args(args, own_redis.url), generator, store)
    video_id = client.post(VIDEOS, data={"prompt": "x"}).json()["id"]
    own_redis.stop()
    for answer in (client.post(VIDEOS, data={"prompt": "x"}), client.get(f"{VIDEOS}/{video_id}")):
        assert answer.status_code == 503, answer.text
        assert answer.headers["x-should-retry"] == "true"
        assert "Traceback" not in answer.text
    with pytest.raises(redis.ConnectionError):
        own_redis.client().ping()
