"""Priorities and deadlines through real Ray Serve and real HTTP: requests of two API keys'
classes sent at once, on a replica with request-level batches, on one with the continuous
loop, and on one whose loop preempts lower classes. High-class requests that wait start
before low-class ones that waited longer (preempting, before the low-class request already
running ends); each image equals the same request sent alone; a request that cannot finish
by its timeout is refused at once, before any of its steps runs; the ingress counts each
class's outcomes."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from ray import serve

from deployments.autoscaling_policy import JOBS_METRIC
from deployments.config.model_config import generator_deployment_name
from serve_app import build_app

from .helpers import decode_png, scrape_until, total

pytestmark = pytest.mark.integration

APP = "priorities"
KEYS = {"gold": "sk-int-gold-51d0", "bulk": "sk-int-bulk-a3e9"}
MODELS = ("tiny-calls", "tiny-loop", "tiny-preempt")
# A 32x32 step of the tiny model takes about 10 ms here: the blocker runs for seconds, the
# short requests for a few tenths each, so their order of completion is their order of start.
BLOCKER_STEPS = 160
# Longer where five requests must reach the replica while it runs.
LONG_BLOCKER_STEPS = 240
# Busy seconds enough for the replica to measure its rate (a window is 2 s of work).
WARM_STEPS = 250
SHORT_STEPS = 30


def model(model_id: str, continuous: bool, preempt: bool = False) -> dict:
    batching = {"max_batch_images": 1, "max_wait_ms": 0, "continuous": continuous}
    return {
        "id": model_id,
        "source": "embedded:tiny-sd3",
        "device": "cpu",
        "default_size": "32x32",
        # One thread and one image a batch (or a loop step): one request runs at a time and
        # the others wait in the replica, where their classes order them.
        "worker_threads": 1,
        "batching": {**batching, "preempt_lower_classes": preempt},
        "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
    }


@pytest.fixture(scope="module")
def base_url(serve_url, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("priority-keys") / "keys"
    keys_file.write_text("\n".join(KEYS.values()) + "\n")
    sha = {name: hashlib.sha256(key.encode()).hexdigest() for name, key in KEYS.items()}
    args = {
        "models": [
            model("tiny-calls", False),
            model("tiny-loop", True),
            model("tiny-preempt", True, preempt=True),
        ],
        "limits": {"max_pixels": 64 * 64, "max_steps": 400},
        "auth": {"api_keys_file": str(keys_file)},
        "request_timeout_s": 60,
        "scheduling": {
            "keys": [
                {"key_sha256": sha["gold"], "priority": "high"},
                {"key_sha256": sha["bulk"], "priority": "low"},
            ],
            # Longer than any wait here: no low-class request ages past a high-class one.
            "aging_s": 60,
        },
    }
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    yield f"{serve_url}/{APP}"
    serve.delete(APP)


def post(base_url: str, key: str, body: dict, **headers: str) -> tuple[httpx.Response, float]:
    """The response, and `time.monotonic()` when it came."""
    response = httpx.post(
        f"{base_url}/v1/images/generations",
        json={"prompt": "a lighthouse", "response_format": "b64_json", **body},
        headers={"authorization": f"Bearer {KEYS[key]}", **headers},
        timeout=60,
    )
    return response, time.monotonic()


def image_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return decode_png(response.json()["data"][0]["b64_json"])


def generator(model_id: str):
    return serve.get_deployment_handle(generator_deployment_name(model_id), APP)


def steps_run(model_id: str) -> int:
    return generator(model_id).counters.remote().result()["steps_run"]


def held_jobs(model_id: str) -> int:
    """The jobs the model's replica holds, running or waiting (what it reports to the
    autoscaling policy)."""
    return int(generator(model_id).record_autoscaling_stats.remote().result()[JOBS_METRIC])


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("model_id", MODELS)
def test_waiting_high_class_requests_start_before_low_class_ones_that_came_first(
    base_url, model_id
):
    def short(seed: int) -> dict:
        return {"model": model_id, "num_inference_steps": SHORT_STEPS, "seed": seed}

    blocker_body = {"model": model_id, "num_inference_steps": LONG_BLOCKER_STEPS, "seed": 5}
    low_bodies = [short(seed) for seed in (11, 12, 13)]
    high_bodies = [short(seed) for seed in (21, 22)]
    with ThreadPoolExecutor(6) as pool:
        # Each group is sent once the replica holds the one before: on a busy machine a
        # request can spend longer than any fixed sleep between client and replica (CI saw
        # a low-class request reach an idle replica before the blocker, and start).
        before = steps_run(model_id)
        blocker = pool.submit(post, base_url, "bulk", blocker_body)
        wait_for(lambda: steps_run(model_id) > before, "the blocker's first step")
        lows = [pool.submit(post, base_url, "bulk", body) for body in low_bodies]
        wait_for(lambda: held_jobs(model_id) == 1 + len(lows), "the low-class requests")
        highs = [pool.submit(post, base_url, "gold", body) for body in high_bodies]
        wait_for(lambda: held_jobs(model_id) == 1 + len(lows) + len(highs), "the high ones")
        assert not blocker.done(), "the blocker ended before every request waited behind it"
        low_answers = [future.result() for future in lows]
        high_answers = [future.result() for future in highs]
        blocked, blocker_finished = blocker.result()
    for response, _ in [*low_answers, *high_answers, (blocked, blocker_finished)]:
        assert response.status_code == 200, response.text
    last_high = max(finished for _, finished in high_answers)
    first_low = min(finished for _, finished in low_answers)
    assert last_high < first_low, "a low-class request started before a waiting high one"
    # Preempting, the loop pauses the low-class blocker's image while the high ones step.
    assert (last_high < blocker_finished) == (model_id == "tiny-preempt")
    # Each image is the one the same request makes alone (paused or not): the high ones, a
    # low one, and the blocker where it was paused.
    bodies = [*high_bodies, low_bodies[0]]
    answers = [*high_answers, low_answers[0]]
    if model_id == "tiny-preempt":
        bodies, answers = [*bodies, blocker_body], [*answers, (blocked, blocker_finished)]
    for body, (response, _) in zip(bodies, answers, strict=True):
        alone, _ = post(base_url, "gold", body)
        assert np.array_equal(image_of(response), image_of(alone))


def test_a_request_that_cannot_finish_by_its_timeout_is_refused_before_any_step(base_url):
    body = {"model": "tiny-calls", "num_inference_steps": BLOCKER_STEPS}
    # Work for over 2 s, so that the replica has measured its rate.
    warm = {"model": "tiny-calls", "num_inference_steps": WARM_STEPS}
    assert post(base_url, "bulk", warm)[0].status_code == 200
    with ThreadPoolExecutor(2) as pool:
        before = steps_run("tiny-calls")
        blocker = pool.submit(post, base_url, "bulk", body)
        wait_for(lambda: steps_run("tiny-calls") > before, "the blocker's first step")
        sent = time.monotonic()
        # Its own steps alone take over 1 s here, the blocker's rest more.
        late, answered = post(
            base_url,
            "gold",
            {"model": "tiny-calls", "num_inference_steps": 200},
            **{"x-request-timeout": "1"},
        )
        assert blocker.result()[0].status_code == 200
    assert late.status_code == 503, late.text
    assert late.json()["error"]["code"] == "deadline_unreachable"
    assert int(late.headers["retry-after"]) >= 1
    assert answered - sent < 0.9  # at once, not at its deadline
    assert steps_run("tiny-calls") - before == BLOCKER_STEPS  # none of its steps ran
    # With time enough, it runs.
    ok, _ = post(
        base_url,
        "gold",
        {"model": "tiny-calls", "num_inference_steps": 200},
        **{"x-request-timeout": "30"},
    )
    assert ok.status_code == 200


def test_the_ingress_counts_each_class_by_outcome(base_url):
    labels = {"model": "tiny-calls"}
    name = "ray_image_generation_class_requests_total"
    expected = [
        {"priority": "high", "outcome": "refused_late"},
        {"priority": "high", "outcome": "ok"},
        {"priority": "low", "outcome": "ok"},
    ]

    # Ray exports each process's metrics every few seconds: wait for every count asserted.
    def counted(samples, tags: dict) -> bool:
        return total(samples, name, **tags, **labels) >= 1

    samples = scrape_until(lambda s: all(counted(s, tags) for tags in expected))
    for tags in expected:
        assert counted(samples, tags), tags
    assert total(samples, "ray_image_generation_class_seconds_count", priority="high") >= 1
