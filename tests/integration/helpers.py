"""Helpers for tests that start real Ray Serve applications on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import re
import time

import httpx
import numpy as np
import ray
from PIL import Image


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def one_at_a_time(*, request_timeout_s: float, max_steps: int = 5000, **limits) -> dict:
    """Args of a replica that runs one request at a time (one worker thread, no batching) on
    32x32 images of the embedded model: its load and timing are easy to reason about. Its
    tests are about timeouts, full queues and scaling, so its replicas refuse nothing for
    its deadline (`tests/integration/test_priorities.py` tests that)."""
    return {
        "scheduling": {"refuse_late": False},
        "models": [
            {"id": "tiny-sd3", "device": "cpu", "default_size": "32x32", "default_steps": 4}
        ],
        "limits": {"max_steps": max_steps, **limits},
        "batching": {"max_batch_images": 1},
        "worker_threads": 1,
        "request_timeout_s": request_timeout_s,
    }


SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape() -> list[tuple[str, dict[str, str], float]]:
    """Every sample of every live node's metrics endpoint (Ray exports per node)."""
    samples = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for line in httpx.get(url, timeout=10).text.splitlines():
            match = SAMPLE.match(line)
            if match:
                labels = dict(LABEL.findall(match["labels"] or ""))
                samples.append((match["name"], labels, float(match["value"])))
    return samples


def total(samples, name: str, **labels: str) -> float:
    return sum(
        value
        for sample_name, sample_labels, value in samples
        if sample_name == name and labels.items() <= sample_labels.items()
    )


def scrape_until(condition, timeout_s: float = 60):
    """Ray exports metrics every few seconds: scrape until `condition(samples)` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape()
        if condition(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(1)
