"""What the benchmarks of `bench.serving` add to running the service as a user does (`serve
run <config>` on a free port, `tests.harness.ServeRun`): the config they serve by default,
their options, the priority of Ray's workers, and Serve's throughput mode. (The GPU benchmark
serves in-process instead: bench/gpu/serve.py says why.)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tests.harness import REPO

LOCAL_CONFIG = REPO / "config" / "local.yaml"


# Ray starts its workers (Serve's proxy and replicas) at niceness 15, below every other
# process of the machine; this puts them at the priority of the others (the seed server, the
# bare pipeline, the load's client), so that a busy machine slows all alike.
SAME_PRIORITY = {"RAY_worker_niceness": "0"}


def direct_ingress_url() -> str:
    """With Serve's direct ingress (throughput mode) the ingress replica serves HTTP itself,
    on the first port of its range (the proxy still answers on the configured port)."""
    return f"http://127.0.0.1:{os.environ.get('RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT', '30000')}"


def serving_options(
    doc: str, *, concurrency: int, duration_s: float, duration_help: str | None = None
) -> argparse.ArgumentParser:
    """The options of a benchmark of the served app (described by its module's `doc`): the
    Serve config it runs, and the closed loop's clients and seconds."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--config", type=Path, default=LOCAL_CONFIG, help="the Serve config `serve run` runs"
    )
    parser.add_argument("--concurrency", type=int, default=concurrency, help="closed-loop clients")
    parser.add_argument("--duration", type=float, default=duration_s, help=duration_help)
    return parser


def add_throughput_option(parser: argparse.ArgumentParser) -> None:
    """`--throughput-optimized`: see `throughput_mode`."""
    parser.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="the service with RAY_SERVE_THROUGHPUT_OPTIMIZED=1, loaded on its ingress's own port",
    )


def throughput_mode(on: bool) -> None:
    """Serve's throughput mode for the `serve run`s this process starts (they inherit it)."""
    if on:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
