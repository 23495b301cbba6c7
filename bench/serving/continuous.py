"""Step-level continuous batching against today's request-level batches, and the ceiling.

    python -m bench.serving.continuous                       # writes bench/results/continuous.json
    python -m bench.serving.continuous --quick               # one round, shorter loads
    python -m bench.serving.continuous --open-only --shares 0.7
                                      # the Poisson points alone (continuous-open.json)

One `serve run` of `config/local.yaml`'s tiny-sd3 model twice over: `tiny-sd3` with the
continuous loop (`batching.continuous: true`) and `tiny-sd3-request` with request-level
batches (the same model and batching otherwise), each with four adapters (the embedded ones,
two of them again at half scale). Both replicas share the machine; every load runs against
one at a time, in alternating rounds, so the machine's noise falls on both alike.

The workload is a realistic mix, each request drawn at random: steps from {4, 8, 12, 20},
guidance from {1.0, 3.5, 5.0, 7.0}, a third with a negative prompt, a third naming one of the
four adapters, at the given sizes (default 64x64 and 128x128). Measured:
- closed loops at 8 and 16 clients, with and without the adapters;
- the same mix at 256x256 (c=16, no adapters) and at 64x64 alone;
- open loops of Poisson arrivals at 50%, 70% and 90% of the request-level engine's capacity
  (its closed-loop rate at c=16 on the mix with adapters), for latency at a rate both can
  hold; figures are medians over the rounds (each round its own seeded arrivals);
- the ceiling: the bare diffusers pipeline in this process, best batch of 1-8 per size.
Throughput is in denoising steps x pixels per second (a 20-step image is 5x a 4-step one);
with CPU seconds per image of the generator replica (the pipeline's work: "inside") and of
the proxy and ingress ("outside"), so that batching gains and serving overhead are seen apart.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.harness.load import PROMPTS, Workload, closed_loop, open_loop
from bench.harness.results import RESULTS, run_header, write_json
from bench.harness.serve_run import LOCAL_CONFIG, SAME_PRIORITY
from bench.serving.adapters import ADAPTERS
from tests.harness import ServeRun, free_port, load_config, with_overrides

CONTINUOUS, REQUEST_LEVEL = "tiny-sd3", "tiny-sd3-request"
STEPS = (4, 8, 12, 20)
GUIDANCE = (1.0, 3.5, 5.0, 7.0)
NEGATIVES = ("blurry, low quality", "text, watermark", "")


@dataclass(frozen=True)
class MixedWorkload(Workload):
    """Requests drawn from the issue's mix; `sizes` replaces `size`, `adapters` may be ()."""

    sizes: tuple[str, ...] = ("64x64",)
    adapters: tuple[str, ...] = ()

    def request(self, rng: random.Random) -> dict:
        body = {
            "model": self.model,
            "prompt": rng.choice(PROMPTS),
            "size": rng.choice(self.sizes),
            "num_inference_steps": rng.choice(STEPS),
            "guidance_scale": rng.choice(GUIDANCE),
            "seed": rng.randrange(2**32),
            "response_format": "b64_json",
        }
        if rng.random() < 1 / 3:
            body["negative_prompt"] = rng.choice(NEGATIVES)
        if self.adapters and rng.random() < 1 / 3:
            body["lora"] = [{"name": rng.choice(self.adapters)}]
        return body


def adapters_of(model_id: str) -> list[dict]:
    suffix = "" if model_id == CONTINUOUS else "-r"
    return [{**adapter, "id": adapter["id"] + suffix} for adapter in ADAPTERS]


def bench_config(config: dict, port: int) -> dict:
    """The config's first model twice, continuous and request-level, with four adapters."""
    model = dict(config["applications"][0]["args"]["models"][0])
    models = []
    for model_id, continuous in ((CONTINUOUS, True), (REQUEST_LEVEL, False)):
        batching = {**config["applications"][0]["args"].get("batching", {})}
        batching["continuous"] = continuous
        models.append(
            {
                **model,
                "id": model_id,
                "adapters": adapters_of(model_id),
                "max_adapters_per_replica": len(ADAPTERS),
                "batching": batching,
            }
        )
    return with_overrides(config, port=port, args={"models": models})


def workload(model_id: str, sizes: tuple[str, ...], adapters: bool) -> MixedWorkload:
    names = tuple(a["id"] for a in adapters_of(model_id)) if adapters else ()
    return MixedWorkload(model_id, sizes[0], 0, model=model_id, sizes=sizes, adapters=names)


# A generator replica's process title, `ray::ServeReplica:<app>:ImageGenerator:<model>`.
GENERATOR_REPLICA = re.compile(r"ServeReplica:\S*:ImageGenerator:")


class CpuMeter:
    """CPU seconds of the generator replica ("inside") and of the rest of the server
    ("outside": proxy, ingress, Ray's daemons; not the other models' generator replicas)
    over one load."""

    def __init__(self, server: ServeRun, model_id: str) -> None:
        self._inside = server.replica_processes(f"ImageGenerator:{model_id}")
        self._outside = [p for p in server.processes() if not _is_generator(p)]

    @staticmethod
    def _cpu(processes) -> float:
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except Exception:  # a process that ended meanwhile
                continue
        return total

    def __enter__(self) -> CpuMeter:
        self._start = (self._cpu(self._inside), self._cpu(self._outside))
        return self

    def __exit__(self, *exc: object) -> None:
        self.inside_s = self._cpu(self._inside) - self._start[0]
        self.outside_s = self._cpu(self._outside) - self._start[1]


def _is_generator(process) -> bool:
    """Whether the process is a generator replica (of any model). Until 2026-12-07 the
    outside was every process but those matching `replica_processes("ImageGenerator")`,
    which matches none (a generator's deployment is `ImageGenerator:<model>`): the outside
    counted the inside too."""
    try:
        return GENERATOR_REPLICA.search(" ".join(process.cmdline())) is not None
    except Exception:  # a process that ended meanwhile
        return False


def figures(result, cpu: CpuMeter) -> dict:
    images = max(result.images, 1)
    return {
        "step_pixels_per_s": round(result.work / result.duration_s),
        "images_per_s": round(result.images_per_s, 3),
        "p50_s": round(result.percentile(50), 3),
        "p95_s": round(result.percentile(95), 3),
        "requests": len(result.latencies_s),
        "statuses": result.statuses,
        "cpu_inside_s_per_image": round(cpu.inside_s / images, 4),
        "cpu_outside_s_per_image": round(cpu.outside_s / images, 4),
    }


def ceiling(sizes: list[str]) -> dict[str, dict]:
    """The bare pipeline's best batch per size, in steps x pixels per second."""
    from bench.serving.bare import measure_bare
    from deployments.config.model_config import ModelConfig
    from deployments.generator.model.pipelines import load_pipeline

    pipeline = load_pipeline(ModelConfig(device="cpu"))
    best = {}
    for size in sizes:
        side = Workload("bare", size, 8)
        runs = measure_bare(pipeline, side, [1, 2, 4, 8], repeats=2)
        batch, row = max(runs.items(), key=lambda item: item[1]["images_per_s"])
        best[size] = {
            "best_batch": batch,
            "step_pixels_per_s": round(row["images_per_s"] * side.steps * side.pixels),
        }
    return best


@dataclass(frozen=True)
class Case:
    name: str
    sizes: tuple[str, ...]
    adapters: bool
    concurrency: int


def cases(sizes: tuple[str, ...]) -> list[Case]:
    mix = "+".join(size.split("x")[0] for size in sizes)  # "64+128": both sizes, square
    return [
        Case(f"mix {mix}, c=8", sizes, False, 8),
        Case(f"mix {mix}, c=16", sizes, False, 16),
        Case(f"mix {mix} + 4 adapters, c=8", sizes, True, 8),
        Case(f"mix {mix} + 4 adapters, c=16", sizes, True, 16),
        Case("mix 256x256, c=16", ("256x256",), False, 16),
        Case("mix 64x64, c=16", ("64x64",), False, 16),
    ]


def run_closed(server: ServeRun, case: Case, model_id: str, duration_s: float, seed: int):
    load = workload(model_id, case.sizes, case.adapters)
    with CpuMeter(server, model_id) as cpu:
        result = closed_loop(server.base_url, load, case.concurrency, duration_s, seed=seed)
    return figures(result, cpu)


def run_open(server: ServeRun, sizes, model_id: str, rate: float, duration_s: float, seed: int):
    load = workload(model_id, sizes, adapters=True)
    with CpuMeter(server, model_id) as cpu:
        result = open_loop(server.base_url, load, rate, duration_s, seed=seed)
    return {**figures(result, cpu), **by_length(result), "rate_per_s": round(rate, 3)}


def by_length(result) -> dict:
    """p95 of the longest quarter of the requests (by steps x pixels) and of the rest: which
    requests the tail is made of."""
    if not result.works:
        return {}
    cut = sorted(result.works)[3 * len(result.works) // 4]
    long = sorted(t for t, w in zip(result.latencies_s, result.works, strict=True) if w >= cut)
    short = sorted(t for t, w in zip(result.latencies_s, result.works, strict=True) if w < cut)

    def p95(values: list[float]) -> float:
        return round(values[round(0.95 * (len(values) - 1))], 3) if values else float("nan")

    return {"p95_longest_quarter_s": p95(long), "p95_rest_s": p95(short)}


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=LOCAL_CONFIG)
    parser.add_argument("--sizes", default="64x64,128x128")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per closed loop")
    parser.add_argument("--open-duration", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round of 5 s loads")
    parser.add_argument(
        "--shares", default="0.5,0.7,0.9", help="Poisson rates, as shares of the capacity"
    )
    parser.add_argument(
        "--open-only",
        action="store_true",
        help="only the Poisson points and the capacity they are shares of (the "
        "request-level engine at c=16 on the mix, unless --capacity-rps gives it)",
    )
    parser.add_argument(
        "--capacity-rps",
        type=float,
        help="the request-level capacity the shares are of (default: measured at c=16)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    if options.quick:
        options.rounds, options.duration, options.open_duration = 1, 5.0, 8.0
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    sizes = tuple(options.sizes.split(","))
    shares = [float(share) for share in options.shares.split(",")]
    engines = (CONTINUOUS, REQUEST_LEVEL)
    bare = {} if options.open_only else ceiling(sorted({*sizes, "256x256"}))
    print(f"ceiling: {bare}", flush=True)
    closed: dict[str, dict[str, list[dict]]] = {}
    opened: dict[str, dict[str, list[dict]]] = {}
    config = bench_config(load_config(options.config), free_port())
    with ServeRun(config, env=SAME_PRIORITY) as server:
        server.wait_for_first_image(model=CONTINUOUS)
        server.wait_for_first_image(model=REQUEST_LEVEL)
        for model_id in engines:  # every adapter loaded once: rounds measure steady state
            warm = workload(model_id, sizes, adapters=True)
            closed_loop(server.base_url, warm, 8, duration_s=3.0)
        capacity_case = cases(sizes)[3]  # the realistic mix, c=16
        for index in range(0 if options.capacity_rps else options.rounds):
            for case in [capacity_case] if options.open_only else cases(sizes):
                order = engines if index % 2 == 0 else engines[::-1]
                for model_id in [REQUEST_LEVEL] if options.open_only else order:
                    row = run_closed(server, case, model_id, options.duration, seed=index)
                    closed.setdefault(case.name, {}).setdefault(model_id, []).append(row)
                    print(f"round {index + 1} {case.name} {model_id}: {row}", flush=True)
        capacity = options.capacity_rps or statistics.median(
            r["requests"] / options.duration for r in closed[capacity_case.name][REQUEST_LEVEL]
        )
        for index in range(options.rounds):  # Poisson arrivals, alternating too
            for share in shares:
                order = engines if index % 2 == 0 else engines[::-1]
                for model_id in order:
                    rate = share * capacity
                    row = run_open(server, sizes, model_id, rate, options.open_duration, index)
                    opened.setdefault(f"{share:.0%} of capacity", {}).setdefault(
                        model_id, []
                    ).append(row)
                    print(f"round {index + 1} open {share:.0%} {model_id}: {row}", flush=True)
    results = {
        **run_header(sizes, options.duration, options.rounds),
        "open_only": options.open_only,
        "ceiling": bare,
        "closed": {
            name: {m: _median(rows) for m, rows in by.items()} for name, by in closed.items()
        },
        "closed_rounds": closed,
        "request_level_capacity_rps": round(capacity, 3),
        "open": {name: {m: _median(rows) for m, rows in by.items()} for name, by in opened.items()},
        "open_rounds": opened,
    }
    results["targets"] = targets(results, sizes)
    name = "continuous-open.json" if options.open_only else "continuous.json"
    write_json(results, options.out / name)
    print(markdown(results))
    return 0


def _median(rows: list[dict]) -> dict:
    keys = [k for k, v in rows[0].items() if isinstance(v, int | float)]
    return {k: round(statistics.median(row[k] for row in rows), 4) for k in keys}


def targets(results: dict, sizes: tuple[str, ...]) -> dict[str, dict]:
    """The issue's targets, each with what was measured."""
    names = [case.name for case in cases(sizes)]
    closed = results["closed"]

    def rate(case: str, model_id: str) -> float:
        return closed[case][model_id]["step_pixels_per_s"]

    checks = {}
    full = not results.get("open_only")
    if full:
        checks["4 adapters >= 90% of no adapters (continuous, c=16)"] = (
            rate(names[3], CONTINUOUS) / rate(names[1], CONTINUOUS),
            0.90,
        )
        checks["mix at 256x256, c=16: continuous >= 1.1x request-level"] = (
            rate(names[4], CONTINUOUS) / rate(names[4], REQUEST_LEVEL),
            1.10,
        )
    if "70% of capacity" in results["open"]:
        p95 = {
            m: results["open"]["70% of capacity"][m]["p95_s"] for m in (CONTINUOUS, REQUEST_LEVEL)
        }
        checks["p95 at 70% of capacity: continuous <= 0.75x request-level"] = (
            p95[CONTINUOUS] / p95[REQUEST_LEVEL],
            0.75,
        )
    if full:
        checks["mix at 64x64, c=16: continuous >= 1.0x request-level"] = (
            rate(names[5], CONTINUOUS) / rate(names[5], REQUEST_LEVEL),
            1.0,
        )
    return {
        name: {
            "measured": round(value, 3),
            "target": goal,
            "met": value <= goal if "p95" in name else value >= goal,
        }
        for name, (value, goal) in checks.items()
    }


def markdown(results: dict) -> str:
    lines = [
        "| load | engine | steps x px/s | vs request-level | p50 s | p95 s "
        "| CPU s/image inside | outside |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [(name, by) for name, by in results["closed"].items()]
    rows += [(f"Poisson {name}", by) for name, by in results["open"].items()]
    for name, by in rows:
        if set(by) != {CONTINUOUS, REQUEST_LEVEL}:  # --open-only: the capacity case alone
            continue
        base = by[REQUEST_LEVEL]["step_pixels_per_s"]
        for model_id in (CONTINUOUS, REQUEST_LEVEL):
            row = by[model_id]
            engine = "continuous" if model_id == CONTINUOUS else "request-level"
            lines.append(
                f"| {name} | {engine} | {row['step_pixels_per_s']:,.0f} | "
                f"{row['step_pixels_per_s'] / base:.2f}x | {row['p50_s']:.3f} | "
                f"{row['p95_s']:.3f} | {row['cpu_inside_s_per_image']:.4f} | "
                f"{row['cpu_outside_s_per_image']:.4f} |"
            )
    ceilings = ", ".join(
        f"{size}: {row['step_pixels_per_s']:,.0f} (batch {row['best_batch']})"
        for size, row in results["ceiling"].items()
    )
    if ceilings:
        lines.append(f"\nCeiling, the bare pipeline's best batch, steps x px/s: {ceilings}.\n")
    for name, check in results["targets"].items():
        verdict = "met" if check["met"] else "MISSED"
        lines.append(f"- {name}: {check['measured']} (target {check['target']}): {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
