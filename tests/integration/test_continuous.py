"""The continuous loop through real Ray Serve and real HTTP: requests with different steps,
guidance, negative prompts, sizes and LoRA adapters sent at once share the replica's loop,
and each answers the image it answers when sent alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from ray import serve

from deployments.config.model_config import generator_deployment_name
from serve_app import build_app

from .helpers import decode_png

pytestmark = pytest.mark.integration

APP = "continuous"
ARGS = {
    "models": [
        {
            "id": "tiny-sd3",
            "source": "embedded:tiny-sd3",
            "device": "cpu",
            "default_size": "32x32",
            "adapters": [
                {"id": "ink", "source": "embedded:tiny-sd3/ink"},
                {"id": "paper", "source": "embedded:tiny-sd3/paper", "scale": 0.6},
            ],
            # One worker thread: one loop, which every request of the test shares.
            "worker_threads": 1,
            "batching": {"max_batch_images": 8, "max_wait_ms": 0, "continuous": True},
            "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
        }
    ],
    "limits": {"max_pixels": 64 * 64, "max_steps": 20},
}

REQUESTS = [
    {"num_inference_steps": 12, "guidance_scale": 7.0},
    {"num_inference_steps": 3, "guidance_scale": 1.0, "size": "64x64"},
    {"num_inference_steps": 6, "guidance_scale": 4.5, "negative_prompt": "blurry"},
    {"num_inference_steps": 4, "guidance_scale": 3.5, "model": "ink"},
    {"num_inference_steps": 8, "guidance_scale": 5.0, "model": "paper"},
    {"num_inference_steps": 5, "lora": [{"name": "ink", "scale": 0.4}, {"name": "paper"}]},
    {"num_inference_steps": 2, "guidance_scale": 2.0, "n": 2},
]


@pytest.fixture(scope="module")
def base_url(serve_url):
    serve.run(build_app(ARGS), name=APP, route_prefix=f"/{APP}")
    yield f"{serve_url}/{APP}"
    serve.delete(APP)


def generate(base_url: str, extra: dict) -> list[np.ndarray]:
    body = {
        "model": "tiny-sd3",
        "prompt": "a lighthouse at dusk",
        "seed": 11,
        "response_format": "b64_json",
        **extra,
    }
    response = httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [decode_png(item["b64_json"]) for item in response.json()["data"]]


def test_mixed_requests_at_once_each_answer_what_they_answer_alone(base_url):
    generate(base_url, {"model": "ink"})  # the adapters loaded, the replica warm
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(lambda extra: generate(base_url, extra), REQUESTS))
    alone = [generate(base_url, extra) for extra in REQUESTS]
    for images, references in zip(together, alone, strict=True):
        for image, reference in zip(images, references, strict=True):
            difference = np.abs(image.astype(np.int16) - reference.astype(np.int16))
            # The project's batched-float32 tolerance (design note 8).
            assert difference.max() <= 1 and (difference > 0).mean() <= 0.001
    handle = serve.get_deployment_handle(generator_deployment_name("tiny-sd3"), APP)
    counters = handle.counters.remote().result(timeout_s=30)
    # The requests sent at once shared loop steps: a step held several of them.
    assert max(counters["batch_sizes"]) >= 3
