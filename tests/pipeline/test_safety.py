"""Output safety on real engines over the embedded SD3, through the real HTTP app in-process:
every image the embedded checker blocks stays on the replica (no b64, no stored url file, no
preview), its request answers OpenAI's `moderation_blocked`, and requests that pass beside
one that is blocked (in the same batch, or the same continuous loop) are unchanged.

The embedded checker's scores are noise, so thresholds decide: 0 blocks every image, and
`moderation: low` (allowed to any caller here) relaxes to 1, which no softmax reaches.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from deployments.config.app_config import AppArgs
from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.config.safety_config import SafetyConfig
from deployments.generator.engine import ImageEngine
from deployments.generator.model.pipelines import load_pipeline
from deployments.generator.safety.image_checker import load_image_checker
from deployments.generator.safety.safety_gate import SafetyGate
from tests.jobs import make_job

from .engine_api import engine_client

GENERATIONS = "/v1/images/generations"
CHECKER = "embedded:tiny-safety-checker"
BATCHING = {
    "calls": BatchingConfig(max_batch_images=4, max_wait_ms=200),
    "loop": BatchingConfig(max_batch_images=4, max_wait_ms=0, continuous=True),
}


@pytest.fixture(scope="module", params=list(BATCHING))
def app(request, tmp_path_factory):
    args = AppArgs.model_validate(
        {
            "models": [
                {
                    "id": "tiny-sd3",
                    "default_size": "32x32",
                    "default_steps": 3,
                    "safety": {
                        "checker": CHECKER,
                        "thresholds": {"nsfw": 0.0},
                        "low_thresholds": {"nsfw": 1.0},
                    },
                }
            ],
            "storage": {"directory": str(tmp_path_factory.mktemp("images"))},
        }
    )
    with engine_client(args, BATCHING[request.param]) as (client, _backends):
        yield client, args


def generate(client, **fields):
    return client.post(GENERATIONS, json={"prompt": "a lighthouse", "seed": 5, **fields})


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


def stored_files(args: AppArgs) -> list[Path]:
    return [path for path in Path(args.storage.directory).rglob("*") if path.is_file()]


def test_a_blocked_image_leaves_the_replica_by_no_route(app):
    client, args = app
    for response_format in ("b64_json", "url"):
        response = generate(client, n=2, response_format=response_format)
        assert response.status_code == 400
        assert response.headers["x-should-retry"] == "false"
        error = response.json()["error"]
        assert error["code"] == "moderation_blocked" and "2 of its 2 images" in error["message"]
        assert "data" not in response.json()
    assert stored_files(args) == []  # no url image was stored
    # Streamed with previews: none is sent (each is checked, and blocked), then the error.
    streamed = generate(
        client, stream=True, stream_progress=True, partial_images=2, num_inference_steps=6
    )
    events = [
        json.loads(line[len("data: ") :])
        for line in streamed.text.splitlines()
        if line.startswith("data: ")
    ]
    types = {event.get("type") for event in events}
    assert "image_generation.progress" in types  # the stream had begun
    assert "image_generation.partial_image" not in types
    assert "image_generation.completed" not in types
    assert "event: error" in streamed.text
    assert events[-1]["error"]["code"] == "moderation_blocked"
    assert "b64_json" not in streamed.text


def test_requests_that_pass_beside_a_blocked_one_are_unchanged(app):
    """Different requests at once, one of them blocked: each other equals its run alone."""
    client, _ = app
    passing = [
        {"prompt": "a red door", "seed": 1, "moderation": "low", "response_format": "b64_json"},
        {
            "prompt": "a blue door",
            "seed": 2,
            "n": 2,
            "moderation": "low",
            "response_format": "b64_json",
        },
    ]
    blocked = {"prompt": "a green door", "seed": 3, "response_format": "b64_json"}
    alone = [client.post(GENERATIONS, json=body).json() for body in passing]
    with ThreadPoolExecutor(3) as pool:
        together = list(
            pool.map(lambda body: client.post(GENERATIONS, json=body), [*passing, blocked])
        )
    assert together[2].status_code == 400
    assert together[2].json()["error"]["code"] == "moderation_blocked"
    for response, expected in zip(together[:2], alone, strict=True):
        assert response.status_code == 200, response.text
        got = [pixels(item) for item in response.json()["data"]]
        want = [pixels(item) for item in expected["data"]]
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):  # batched float32's tolerance (note 8)
            difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
            assert difference.max() <= 1 and (difference > 0).mean() <= 0.001


def test_the_openai_client_raises_a_bad_request_with_the_code(app):
    client, _ = app
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    with pytest.raises(openai.BadRequestError) as raised:
        api.images.generate(model="tiny-sd3", prompt="a lighthouse", response_format="b64_json")
    assert raised.value.code == "moderation_blocked"


def test_a_threshold_for_a_category_the_checker_lacks_fails_the_start():
    config = SafetyConfig(checker=CHECKER, thresholds={"violence": 0.5})
    with pytest.raises(ValueError, match=r"models\[\]\.safety\.thresholds"):
        load_image_checker(config, torch.device("cpu"))


def test_the_checkers_cost_per_image_is_printed():
    """Not asserted: printed for the note (`pytest -s`), as a benchmark would."""
    checker = load_image_checker(SafetyConfig(checker=CHECKER), torch.device("cpu"))
    images = [np.full((512, 512, 3), i, dtype=np.uint8) for i in range(8)]
    checker.scores(images[:1])  # warm
    started = time.perf_counter()
    scores = checker.scores(images)
    per_image = (time.perf_counter() - started) / len(images)
    assert len(scores) == 8 and all(set(score) == {"normal", "nsfw"} for score in scores)
    print(f"embedded checker: {per_image * 1000:.2f} ms per 512x512 image (batch of 8, CPU)")


class FailingForOne(SafetyGate):
    """A gate whose check fails (as a checker out of memory would) for one request."""

    def screen(self, job, result):
        if job.request_id == "poison":
            raise RuntimeError("the checker failed")
        return super().screen(job, result)


@pytest.mark.parametrize("mode", list(BATCHING))
def test_a_failing_check_fails_its_own_request_only(mode):
    """In one batch (calls) or one loop: the others are answered, the replica stays well."""
    pipeline = load_pipeline(ModelConfig(device="cpu"))
    config = SafetyConfig(checker=CHECKER, thresholds={"nsfw": 1.0})  # blocks nothing
    gate = FailingForOne(load_image_checker(config, torch.device("cpu")), config)
    batching = BATCHING[mode]
    engine = ImageEngine(
        pipeline, 1, batching=batching, continuous=batching.continuous, safety=gate
    )
    jobs = [make_job(seed, width=32, height=32, request_id=f"r{seed}") for seed in range(3)]
    jobs.append(make_job(9, width=32, height=32, request_id="poison"))

    async def run_all():
        return await asyncio.gather(*(engine.generate(job) for job in jobs), return_exceptions=True)

    try:
        results = asyncio.run(run_all())
    finally:
        engine.shutdown()
    assert all(len(result.images) == 1 for result in results[:3])
    assert isinstance(results[3], RuntimeError)
    engine.check_health()  # no device failure: still healthy
