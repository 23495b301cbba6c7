"""The benchmark: this service, a server built as diffusers' guide describes, and the bare
pipeline, side by side on the same model and requests.

    python -m bench.run --config config/local.yaml

It starts the application with `serve run` on 127.0.0.1 and the seed-guide server
(`bench/seed_server.py`) beside it, and loads the bare pipeline in this process: all three up
at once. Then, in alternating rounds (the order rotates each round, so the machine's noise
falls on all alike), for small images (64x64, where per-request overhead dominates) and
large ones (256x256): closed-loop load at `--concurrency` clients on each server, and the
bare pipeline's images/s at each batch size (its best batch is the ceiling); and a lone
client on the service against the bare pipeline's batch-1 time. It checks the targets on
the median round and writes bench/results/latest.json, bench/results/latest.png and the
README's results section.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
from pathlib import Path

import torch

from bench import report
from bench.bare import measure_bare
from bench.load import Workload, closed_loop
from bench.server import (
    REPO,
    SAME_PRIORITY,
    SeedServer,
    ServeRun,
    free_port,
    load_config,
    with_overrides,
)
from deployments.generator.pipelines import load_pipeline
from serve_app import parse_args

WORKLOADS = {
    "small": Workload("small", size="64x64", steps=8),
    "large": Workload("large", size="256x256", steps=8),
}
BARE_BATCH_SIZES = [1, 2, 4, 8]
SERVERS = ("service", "seed")


def served(base_url: str, workload: Workload, concurrency: int, duration_s: float) -> dict:
    """Images/s and p50 latency of closed-loop load on one server."""
    result = asyncio.run(closed_loop(base_url, workload, concurrency, duration_s))
    return {
        "images_per_s": round(result.images_per_s, 3),
        "p50_s": round(result.percentile(50), 4) if result.latencies_s else None,
        "errors": result.errors,
        "statuses": result.statuses,
    }


def bare(pipeline, workload: Workload) -> dict:
    """The bare pipeline's best batch (images/s) and its batch-1 seconds per call."""
    rows = measure_bare(pipeline, workload, BARE_BATCH_SIZES, repeats=3)
    best = max(rows, key=lambda batch: rows[batch]["images_per_s"])
    return {
        "images_per_s": rows[best]["images_per_s"],
        "best_batch": best,
        "batch1_s": rows[1]["s_per_call"],
        "by_batch": {str(batch): row["images_per_s"] for batch, row in rows.items()},
    }


def direct_ingress_url() -> str:
    """With Serve's direct ingress (throughput mode) the ingress replica serves HTTP itself,
    on the first port of its range (the proxy still answers on the configured port)."""
    return f"http://127.0.0.1:{os.environ.get('RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT', '30000')}"


def one_round(index: int, urls: dict[str, str], pipeline, options) -> dict:
    """Every system on every workload once, in an order that rotates with `index`."""
    systems = ["service", "seed", "bare"]
    shift = index % len(systems)
    systems = systems[shift:] + systems[:shift]
    measured: dict = {name: {} for name in WORKLOADS}
    for name, workload in WORKLOADS.items():
        for system in systems:
            if system == "bare":
                measured[name]["bare"] = bare(pipeline, workload)
            else:
                measured[name][system] = served(
                    urls[system], workload, options.concurrency, options.duration
                )
        # A lone client on the service: its latency against the bare batch-1 call.
        measured[name]["service_alone"] = served(urls["service"], workload, 1, options.duration)
        print(f"round {index + 1}, {name}: {report.round_line(measured[name])}", flush=True)
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "config" / "local.yaml")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--duration", type=float, default=8.0, help="seconds of load per server and round"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--no-readme", action="store_true", help="don't update README.md")
    parser.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="the service with RAY_SERVE_THROUGHPUT_OPTIMIZED=1, loaded on its ingress's own port",
    )
    options = parser.parse_args(argv)
    if options.throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"

    config = load_config(options.config)
    app_args = parse_args(config["applications"][0].get("args"))
    # The default model is measured (the others, if any, sit idle on their own replicas).
    model = app_args.model_by_id()[app_args.default_model_id]
    torch.set_num_threads(os.cpu_count() or 1)  # the ceiling uses every core
    pipeline = load_pipeline(model)
    rounds = []
    with (
        ServeRun(with_overrides(config, port=free_port()), env=SAME_PRIORITY) as service,
        SeedServer(model.source, free_port()) as seed,
    ):
        service.wait_for_first_image()
        seed.wait_for_first_image()
        urls = {"service": service.base_url, "seed": seed.base_url}
        if options.throughput_optimized:
            urls["service"] = direct_ingress_url()
        for index in range(options.rounds):
            rounds.append(one_round(index, urls, pipeline, options))

    results = {
        "date": datetime.date.today().isoformat(),
        "config": os.path.relpath(options.config, REPO),
        "model": model.source,
        "machine": report.machine(),
        "duration_s": options.duration,
        "concurrency": options.concurrency,
        "workloads": {name: {"size": w.size, "steps": w.steps} for name, w in WORKLOADS.items()},
        "throughput_optimized": options.throughput_optimized,
        "rounds": rounds,
    }
    results["summary"] = report.summarize(rounds)
    results["targets"] = report.check_targets(results["summary"], options.concurrency)

    options.out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, options.out / "latest.json")
    report.write_chart(results, options.out / "latest.png")
    chart = os.path.relpath(options.out / "latest.png", REPO)
    section = report.markdown(results, str(chart))
    if not options.no_readme:
        report.update_readme(REPO / "README.md", section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
