"""The benchmark: served throughput and latency, batched and not, against the bare pipeline.

    python -m bench.run --config config/local.yaml

For each mode (batching as configured, then `max_batch_images: 1`) it starts the application
with `serve run` on 127.0.0.1, drives closed-loop load at each concurrency for two workloads
(small images, where per-call overhead dominates; large ones, compute-bound), and samples the
generator replica's memory. It measures the bare pipeline in-process as the ceiling, checks
the targets, and writes bench/results/latest.json, bench/results/latest.png and the README's
results section.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from bench import report
from bench.bare import measure_bare, weights_bytes
from bench.load import Workload, run_load
from bench.server import REPO, ServeRun, free_port, load_config, with_overrides
from deployments.generator.pipelines import load_pipeline
from deployments.model_config import generator_deployment_name
from serve_app import parse_args

WORKLOADS = {
    "small": Workload("small", size="64x64", steps=4),
    "large": Workload("large", size="512x512", steps=4),
}
MODES = {"batched": {}, "unbatched": {"batching": {"max_batch_images": 1}}}
BARE_BATCH_SIZES = [1, 2, 4, 8, 16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "config" / "local.yaml")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--duration", type=float, default=15.0, help="seconds of load per workload and concurrency"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--no-readme", action="store_true", help="don't update README.md")
    options = parser.parse_args(argv)

    config = load_config(options.config)
    app_args = parse_args(config["applications"][0].get("args"))
    batching = app_args.batching
    capacity = {
        name: max(1, min(batching.max_batch_images, batching.max_batch_pixels // w.pixels))
        for name, w in WORKLOADS.items()
    }

    bare: dict[str, dict] = {}
    # The default model is measured (the others, if any, sit idle on their own replicas).
    model = app_args.model_by_id()[app_args.default_model_id]
    pipeline = load_pipeline(model)
    weights = weights_bytes(pipeline)
    for name, workload in WORKLOADS.items():
        print(f"bare pipeline, {name} ({workload.size})...", flush=True)
        measured = measure_bare(pipeline, workload, BARE_BATCH_SIZES)
        bare[name] = {str(batch): row for batch, row in measured.items()}
        print("  ", {batch: row["images_per_s"] for batch, row in measured.items()}, flush=True)

    del pipeline  # the servers below need the memory and cores

    served: dict[str, dict[str, list]] = {}
    for mode, overrides in MODES.items():
        served[mode] = {}
        config_for_mode = with_overrides(config, port=free_port(), args=overrides)
        with ServeRun(config_for_mode) as server:
            _, startup_s = server.wait_for_first_image()
            replica = server.replica_processes(generator_deployment_name(model.id))
            print(
                f"{mode}: serving after {startup_s:.1f} s; replica pids {[p.pid for p in replica]}",
                flush=True,
            )
            for name, workload in WORKLOADS.items():
                served[mode][name] = []
                for concurrency in options.concurrency:
                    result = run_load(
                        server.base_url, workload, concurrency, options.duration, replica
                    )
                    summary = result.summary()
                    served[mode][name].append(summary)
                    print(f"  {name} c={concurrency}: {summary}", flush=True)

    results = {
        "date": datetime.date.today().isoformat(),
        "config": os.path.relpath(options.config, REPO),
        "model": model.source,
        "machine": report.machine(),
        "duration_s": options.duration,
        "concurrencies": options.concurrency,
        "workloads": {name: {"size": w.size, "steps": w.steps} for name, w in WORKLOADS.items()},
        "batching": batching.model_dump(),
        "batch_capacity": capacity,
        "weights_bytes": weights,
        "bare": bare,
        "served": served,
    }
    results["targets"] = report.check_targets(results)

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
