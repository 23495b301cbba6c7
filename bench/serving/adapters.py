"""The cost of LoRA adapters under load: the same closed-loop load with no adapter, and with
each request naming one of four adapters at random.

    python -m bench.serving.adapters --config config/local.yaml

It starts the application with `serve run` on 127.0.0.1, its default model given four
adapters (the embedded ones of `tiny-sd3`, two of them twice under other ids and scales, so
that four distinct adapters are loaded and switched), and loads it in alternating rounds, base
then adapters, so that the machine's noise falls on both alike. Requests with different
adapter sets cannot share a batch nor overlap on the replica's modules, so the difference is
what switching and split batches cost. Writes bench/results/adapters.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.harness.load import Workload, closed_loop
from bench.harness.results import RESULTS, machine, write_json
from bench.harness.serve_run import serving_options
from tests.harness import REPO, ServeRun, free_port, load_config, with_overrides

ADAPTERS = [
    {"id": "ink", "source": "embedded:tiny-sd3/ink"},
    {"id": "paper", "source": "embedded:tiny-sd3/paper"},
    {"id": "ink-soft", "source": "embedded:tiny-sd3/ink", "scale": 0.5},
    {"id": "paper-soft", "source": "embedded:tiny-sd3/paper", "scale": 0.5},
]


@dataclass(frozen=True)
class AdapterWorkload(Workload):
    """A workload whose requests each name one of `adapters` (none: the base model)."""

    adapters: tuple[str, ...] = ()

    def request(self, rng: random.Random) -> dict:
        request = super().request(rng)
        if self.adapters:
            request["model"] = rng.choice(self.adapters)
        return request


def adapter_config(config: dict, port: int) -> dict:
    """`config` on `port`, its first model given the four adapters (all held at once)."""
    models = [dict(model) for model in config["applications"][0]["args"]["models"]]
    models[0]["adapters"] = ADAPTERS
    models[0]["max_adapters_per_replica"] = len(ADAPTERS)
    return with_overrides(config, port=port, args={"models": models})


def measure(base_url: str, workload: Workload, concurrency: int, duration_s: float, seed: int):
    result = closed_loop(base_url, workload, concurrency, duration_s, seed=seed)
    return {
        "images_per_s": result.images_per_s,
        "p50_s": result.percentile(50),
        "p95_s": result.percentile(95),
        "statuses": result.statuses,
    }


def main(argv: list[str] | None = None) -> int:
    parser = serving_options(
        __doc__, concurrency=16, duration_s=10.0, duration_help="seconds per round"
    )
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each, alternating")
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args(argv)

    workloads = {
        "no adapter": AdapterWorkload("base", options.size, options.steps),
        "4 adapters": AdapterWorkload(
            "adapters", options.size, options.steps, adapters=tuple(a["id"] for a in ADAPTERS)
        ),
    }
    rounds: dict[str, list[dict]] = {name: [] for name in workloads}
    config = adapter_config(load_config(options.config), free_port())
    with ServeRun(config) as server:
        _, startup_s = server.wait_for_first_image()
        print(f"serving after {startup_s:.1f} s", flush=True)
        # Load every adapter once, so the rounds measure switching, not first loads.
        warm = AdapterWorkload(
            "warm", options.size, options.steps, adapters=workloads["4 adapters"].adapters
        )
        closed_loop(server.base_url, warm, len(ADAPTERS), rounds=2)
        for index in range(options.rounds):
            for name, workload in workloads.items():
                result = measure(
                    server.base_url, workload, options.concurrency, options.duration, seed=index
                )
                rounds[name].append(result)
                print(f"round {index + 1} {name}: {json.dumps(result)}", flush=True)

    summary = {
        name: {
            "images_per_s_median": statistics.median(r["images_per_s"] for r in results),
            "images_per_s_rounds": [round(r["images_per_s"], 2) for r in results],
            "p50_s_median": statistics.median(r["p50_s"] for r in results),
            "p95_s_median": statistics.median(r["p95_s"] for r in results),
        }
        for name, results in rounds.items()
    }
    results = {
        "date": datetime.date.today().isoformat(),
        "config": os.path.relpath(options.config, REPO),
        "machine": machine(),
        "concurrency": options.concurrency,
        "size": options.size,
        "steps": options.steps,
        "duration_s": options.duration,
        "rounds": rounds,
        "summary": summary,
    }
    write_json(results, options.out / "adapters.json")
    print(markdown(summary, options))
    return 0


def markdown(summary: dict, options: argparse.Namespace) -> str:
    lines = [
        f"| requests (c={options.concurrency}, {options.size}, {options.steps} steps) "
        "| images/s (median) | each round | p50 s | p95 s |",
        "|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        lines.append(
            f"| {name} | {row['images_per_s_median']:.2f} | "
            f"{', '.join(map(str, row['images_per_s_rounds']))} | "
            f"{row['p50_s_median']:.3f} | {row['p95_s_median']:.3f} |"
        )
    base, adapters = (summary[name]["images_per_s_median"] for name in summary)
    lines.append(f"\nWith adapters: {adapters / base:.0%} of the base model's throughput.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
