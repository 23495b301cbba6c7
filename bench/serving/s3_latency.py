"""What a bucket costs per `url` image against a directory: the time to store an image (what
a `url` answer waits for) and to read it back (a fetch of its URL), for the directory store
on local disk and the bucket store on moto's S3 API, run as its own process on 127.0.0.1.

    python -m bench.serving.s3_latency [--rounds 50]

Loopback measures the client's own cost (signing, HTTP, botocore) plus moto's; a real store
adds the network's round trips and its own write time on top.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import numpy as np
from PIL import Image

from deployments.config.app_config import S3Config
from deployments.storage import ImageStore
from deployments.storage.object_store import S3ImageStore
from tests.harness import free_port


def image_png(side: int) -> bytes:
    """A PNG about as compressible as a generated picture: smooth shapes, a little noise."""
    y, x = np.mgrid[0:side, 0:side] / side
    rng = np.random.default_rng(0)
    pixels = np.stack([np.sin(6 * x + 3 * y), np.cos(5 * y), np.sin(4 * x * y)], axis=-1)
    pixels = (pixels + 1) * 110 + rng.normal(0, 6, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def timed(function: Callable[[], object], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return times


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"median {statistics.median(times):6.2f} ms  p90 {p90:6.2f} ms"


# Dummy credentials for moto, and nothing from this machine's AWS files or metadata service.
MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "bench-access-key",
    "AWS_SECRET_ACCESS_KEY": "bench-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def start_moto(port: int) -> subprocess.Popen:
    """moto's S3 server in a process of its own (not sharing this one's GIL)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            client.list_buckets()
            return process
        except Exception:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError("moto's server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    rounds = parser.parse_args().rounds
    os.environ.update(MOTO_ENV)
    port = free_port()
    moto = start_moto(port)
    try:
        endpoint_url = f"http://127.0.0.1:{port}"
        bucket = "bench-images"
        boto3.client("s3", endpoint_url=endpoint_url).create_bucket(Bucket=bucket)
        s3 = S3Config(bucket=bucket, endpoint_url=endpoint_url, read_timeout_s=10)
        with tempfile.TemporaryDirectory() as directory:
            stores = {
                "directory": ImageStore(Path(directory), ttl_s=3600),
                "s3 (moto)": S3ImageStore(s3, ttl_s=3600),
            }
            for side in (512, 1024):
                data = image_png(side)
                print(f"{side}x{side} PNG, {len(data) / 1e6:.2f} MB, {rounds} rounds")
                medians = {}
                for label, store in stores.items():
                    store.save(data, "png")  # warm: connections, disk cache
                    saves = timed(lambda store=store, data=data: store.save(data, "png"), rounds)
                    name = store.save(data, "png")
                    reads = timed(lambda store=store, name=name: store.read(name), rounds)
                    medians[label] = (statistics.median(saves), statistics.median(reads))
                    print(f"  {label:10s} save {summary(saves)}   read {summary(reads)}")
                save_extra = medians["s3 (moto)"][0] - medians["directory"][0]
                read_extra = medians["s3 (moto)"][1] - medians["directory"][1]
                print(f"  extra per image: save +{save_extra:.2f} ms, read +{read_extra:.2f} ms")
            stores["directory"].close()
    finally:
        moto.terminate()
        moto.wait()


if __name__ == "__main__":
    main()
