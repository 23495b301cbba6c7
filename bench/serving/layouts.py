"""How a CPU replica should spend its cores: worker threads, torch threads, or replicas.

    python -m bench.serving.layouts --config config/local.yaml

Serves the config's default model under each layout below at once, in one `serve run` (a
deployment per layout; Ray is told the machine has 16 CPUs, so each layout gets the CPUs it
asks for, while all share the machine's real cores), and loads them in alternating rounds:
closed-loop load at `--concurrency` clients of 64x64 and of 256x256 images (8 steps), then a
lone client. Prints images/s and the lone client's p50 (median round) and writes
bench/results/layouts.json.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
from typing import Any

from bench.harness.load import Workload
from bench.harness.results import RESULTS, write_json
from bench.harness.serve_run import SAME_PRIORITY, serving_options
from bench.serving.compare import WORKLOADS, served
from serve_app import parse_args
from tests.harness import ServeRun, free_port, load_config, with_overrides

# name: (worker threads, CPUs per replica, replicas); torch threads = CPUs // worker threads.
LAYOUTS = {
    "2 worker threads x 1 torch thread (shipped)": (2, 1, 1),
    "1 worker thread x 2 torch threads": (1, 2, 1),
    "2 replicas x 1 worker thread x 1 torch thread": (1, 1, 2),
}
OUT = RESULTS / "layouts.json"


def layout_models(model: dict[str, Any]) -> list[dict[str, Any]]:
    """The default model's config once per layout, each under its own id."""
    models = []
    for index, (worker_threads, cpus, replicas) in enumerate(LAYOUTS.values()):
        variant = copy.deepcopy(model)
        variant["id"] = f"layout-{index}"
        variant.pop("adapters", None)
        variant["worker_threads"] = worker_threads
        deployment = variant.setdefault("deployment", {})
        deployment.setdefault("ray_actor_options", {})["num_cpus"] = cpus
        deployment["autoscaling_config"] = {
            **deployment.get("autoscaling_config", {}),
            "min_replicas": replicas,
            "max_replicas": replicas,
            "initial_replicas": replicas,
        }
        models.append(variant)
    return models


def one_round(index: int, url: str, models: list[dict[str, Any]], options) -> dict[str, Any]:
    """Every layout on every workload once, in an order that rotates with `index`."""
    names = list(LAYOUTS)
    ids = {name: variant["id"] for name, variant in zip(names, models, strict=True)}
    shift = index % len(names)
    measured: dict[str, dict[str, Any]] = {name: {} for name in names}
    for size_name, workload in WORKLOADS.items():
        for name in names[shift:] + names[:shift]:
            ours = Workload(size_name, workload.size, workload.steps, model=ids[name])
            busy = served(url, ours, options.concurrency, options.duration)
            measured[name][size_name] = busy
            measured[name][f"{size_name}_alone"] = served(url, ours, 1, options.duration / 2)
            print(f"round {index + 1}, {size_name}, {name}: {busy['images_per_s']} img/s")
    return measured


def summarize(rounds: list[dict[str, Any]], name: str) -> dict[str, float]:
    """A layout's median round: images/s under load and a lone client's p50, per size."""
    figures = {}
    for size_name in WORKLOADS:
        busy = [measured[name][size_name]["images_per_s"] for measured in rounds]
        alone = [measured[name][f"{size_name}_alone"]["p50_s"] for measured in rounds]
        figures[f"{size_name} images/s"] = statistics.median(busy)
        figures[f"{size_name} alone p50 s"] = statistics.median(alone)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = serving_options(__doc__, concurrency=8, duration_s=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args(argv)

    config = load_config(options.config)
    args = config["applications"][0]["args"]
    default = parse_args(args).default_model_id
    model = next(m for m in args["models"] if m["id"] == default)
    models = layout_models(model)
    config = with_overrides(config, port=free_port(), args={"models": models})
    env = {**SAME_PRIORITY, "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 16})}
    rounds: list[dict[str, dict[str, Any]]] = []
    with ServeRun(config, env=env) as service:
        for variant in models:
            service.wait_for_first_image(model=variant["id"])
        for index in range(options.rounds):
            rounds.append(one_round(index, service.base_url, models, options))
    summary = {name: summarize(rounds, name) for name in LAYOUTS}
    for name, figures in summary.items():
        print(name, json.dumps(figures))
    write_json({"layouts": LAYOUTS, "summary": summary, "rounds": rounds}, OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
