"""The service's metrics on Ray's Prometheus endpoint, scraped as Prometheus would."""

from __future__ import annotations

import httpx
import pytest
from ray import serve

from serve_app import build_app

from .helpers import scrape, scrape_until, total

pytestmark = pytest.mark.integration

MODEL_ID = "metrics-sd3"  # its own id: other modules' replicas report under theirs
ARGS = {
    "models": [
        {
            "id": MODEL_ID,
            "device": "cpu",
            "default_size": "32x32",
            "default_steps": 5,
            "adapters": [{"id": "metrics-ink", "source": "embedded:tiny-sd3/ink"}],
        }
    ],
    "limits": {"max_body_bytes": 4096},
}


@pytest.fixture(scope="module")
def base_url(serve_url):
    serve.run(build_app(ARGS), name="metrics", route_prefix="/metrics-test")
    yield f"{serve_url}/metrics-test"
    serve.delete("metrics")


def test_generation_metrics_appear_with_sensible_values(base_url):
    generations = f"{base_url}/v1/images/generations"
    for n in (1, 3):
        response = httpx.post(generations, json={"prompt": "x", "n": n}, timeout=60)
        assert response.status_code == 200
    errors_before = total(scrape(), "ray_image_generation_errors_total", code="request_too_large")
    for _ in range(2):
        too_large = httpx.post(generations, json={"prompt": "x" * 5000}, timeout=60)
        assert too_large.status_code == 413

    model = {"model": MODEL_ID}
    samples = scrape_until(
        lambda s: (
            total(s, "ray_image_generation_images_total", **model) >= 4
            and total(s, "ray_image_generation_errors_total", code="request_too_large")
            >= errors_before + 2
        )
    )
    assert total(samples, "ray_image_generation_images_total", **model) == 4
    assert total(samples, "ray_image_generation_seconds_count", **model) == 2
    assert total(samples, "ray_image_generation_seconds_bucket", le="+Inf", **model) == 2
    assert total(samples, "ray_image_generation_denoising_steps_total", **model) == 10
    assert total(samples, "ray_image_generation_batch_size_count", **model) == 2
    # Batches of 1 and 3 images: one in the bucket up to 1, both up to 4.
    assert total(samples, "ray_image_generation_batch_size_bucket", le="1.0", **model) == 1
    assert total(samples, "ray_image_generation_batch_size_bucket", le="4.0", **model) == 2
    steps_per_second = total(samples, "ray_image_generation_denoising_steps_per_second", **model)
    assert 1 < steps_per_second < 100_000
    assert total(samples, "ray_image_generation_requests_waiting", **model) == 0
    errors = total(samples, "ray_image_generation_errors_total", code="request_too_large")
    assert errors == errors_before + 2
    print(f"\n[metrics] denoising steps per second: {steps_per_second:.1f}")
    # Serve's own metrics come from the same endpoint.
    assert any(name.startswith("ray_serve_") for name, _, _ in samples)


def test_adapter_loads_are_counted_and_timed(base_url):
    generations = f"{base_url}/v1/images/generations"
    for _ in range(2):  # loaded once, then held
        response = httpx.post(generations, json={"prompt": "x", "model": "metrics-ink"}, timeout=60)
        assert response.status_code == 200
    adapter = {"model": MODEL_ID, "adapter": "metrics-ink"}
    samples = scrape_until(
        lambda s: total(s, "ray_image_generation_adapter_load_seconds_count", **adapter) >= 1
    )
    assert total(samples, "ray_image_generation_adapter_loads_total", **adapter) == 1
    assert total(samples, "ray_image_generation_adapter_load_seconds_count", **adapter) == 1
