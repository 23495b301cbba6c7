"""How many quota decisions per second one ingress process makes against a Redis.

Each decision is one run of the admission script (`deployments/ingress/quota_store.py`) for
a key with all three limits (requests, image-steps, concurrency), followed by the release of
its slot, as a request that ends does. `--concurrency` decisions are in flight at once, over
`--keys` keys, in one event loop (one ingress replica's). Without `--redis-url` it starts a
`redis-server` of its own on a free port (nothing saved to disk).

    python -m bench.serving.quota_decisions --seconds 5 --concurrency 1 16 64
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import redis

from deployments.config.quota_config import KeyLimits
from deployments.ingress.quota_store import RedisQuotaStore

LIMITS = KeyLimits(requests=10**9, image_steps=10**12, concurrent_requests=10**6)


def start_redis() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", tempfile.mkdtemp()],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


async def measure(url: str, seconds: float, concurrency: int, keys: int) -> float:
    store = RedisQuotaStore(
        url, None, timeout_s=1.0, prefix="bench:", window_s=60.0, slot_ttl_s=170.0
    )
    decisions = 0
    stop = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal decisions
        key = f"key{index % keys}"
        while time.perf_counter() < stop:
            slot = uuid.uuid4().hex
            await store.admit(key, LIMITS, 20, slot)
            await store.release(key, slot)
            decisions += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    return decisions / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="a Redis to use (default: start one)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--keys", type=int, default=8)
    options = parser.parse_args()
    process, url = (None, options.redis_url) if options.redis_url else start_redis()
    try:
        for concurrency in options.concurrency:
            rate = asyncio.run(measure(url, options.seconds, concurrency, options.keys))
            print(f"concurrency {concurrency:4d}: {rate:8.0f} decisions/s (admit + release)")
    finally:
        if process is not None:
            process.terminate()
            process.wait()


if __name__ == "__main__":
    main()
