"""Compile inside the continuous loop: the loop on a compiled denoiser against request-level
batches on the same compiled denoiser, and against the loop without compile, with what the
padding rows cost.

    python -m bench.engine.loop_compile            # writes bench/results/loop-compile.json
    python -m bench.engine.loop_compile --quick    # one round of 5 s loads

In this process, no server: the lever is the engine's, and Ray's and HTTP's costs would
only blur it (`bench.serving.continuous` measures the engines through the service). One
tiny-sd3 pipeline compiled with inductor (`optimizations.compile`, warmed at the mix's sizes
as a replica's start warms it: request-level calls and the loop's row counts) serves two
engines in turn, the loop (`compiled=True`: its steps padded to warmed row counts) and
request-level batches; a second, uncompiled pipeline serves the loop eager. Each engine has
two worker threads, one torch thread each, as a replica on this 2-core machine. The workload
is `bench.serving.continuous`'s mix without adapters (adapters and compile do not combine):
steps from {4, 8, 12, 20}, guidance from {1.0, 3.5, 5.0, 7.0}, a third with a negative
prompt, 64x64 and 128x128, in closed loops of 8 and 16 clients, the engines in alternating
order each round. Throughput is steps x pixels per second; "padding" is the share of the
loop's forward rows that were padding (`counters()["loop_rows"]`).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.harness.results import RESULTS, run_header, write_json
from bench.serving.continuous import MixedWorkload, workload
from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.config.optimizations_config import CompileConfig
from deployments.generator.calls.warmup import compiled_graphs, prepare_to_serve
from deployments.generator.engine import ImageEngine
from deployments.generator.model.pipelines import load_pipeline
from deployments.generator.model.torch_threads import cpu_threads_per_call
from deployments.jobs import GenerationJob

WORKERS = 2
LOOP = BatchingConfig(continuous=True)
REQUEST_LEVEL = BatchingConfig(continuous=False)
ENGINES = ("loop + compile", "request-level + compile", "loop, eager")


def mixed_job(mix: MixedWorkload, rng: random.Random, index: int) -> GenerationJob:
    """The next request of `bench.serving.continuous`'s mix, as the job the engine takes."""
    body = mix.request(rng)
    width, height = (int(side) for side in body["size"].split("x"))
    return GenerationJob(
        prompt=body["prompt"],
        negative_prompt=body.get("negative_prompt"),
        width=width,
        height=height,
        num_inference_steps=body["num_inference_steps"],
        guidance_scale=body["guidance_scale"],
        seeds=(body["seed"],),
        request_id=f"bench-{index}",
    )


async def closed_loop(
    engine: ImageEngine, clients: int, seconds: float, sizes: tuple[int, ...], seed: int
) -> dict:
    """`clients` callers each sending its next job when its last is answered."""
    rng = random.Random(seed)
    mix = workload("bench", tuple(f"{side}x{side}" for side in sizes), adapters=False)
    work, latencies = 0, []
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()

    async def client(number: int) -> None:
        nonlocal work
        index = 0
        while time.perf_counter() < deadline:
            job = mixed_job(mix, rng, number * 10_000 + index)
            index += 1
            sent = time.perf_counter()
            await engine.generate(job)
            latencies.append(time.perf_counter() - sent)
            work += job.width * job.height * job.num_inference_steps

    await asyncio.gather(*(client(number) for number in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "step_pixels_per_s": round(work / elapsed),
        "images_per_s": round(len(latencies) / elapsed, 3),
        "p50_s": round(latencies[len(latencies) // 2], 3),
        "p95_s": round(latencies[round(0.95 * (len(latencies) - 1))], 3),
    }


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,128", help="square sides of the mix")
    parser.add_argument("--clients", default="8,16")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round of 5 s loads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    if options.quick:
        options.rounds, options.duration = 1, 5.0
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    sizes = tuple(int(side) for side in options.sizes.split(","))
    torch.set_num_threads(cpu_threads_per_call(WORKERS))
    model = ModelConfig(
        device="cpu",
        default_size=f"{sizes[0]}x{sizes[0]}",
        optimizations={"compile": CompileConfig(warmup_sizes=[f"{s}x{s}" for s in sizes])},
    )
    compiled = load_pipeline(model)
    started = time.perf_counter()
    warmup = prepare_to_serve(compiled, model, LOOP, continuous=True)
    start_s = time.perf_counter() - started
    print(f"compiled and warmed in {start_s:.1f} s: {warmup}", flush=True)
    eager = load_pipeline(ModelConfig(device="cpu"))
    engines = {
        ENGINES[0]: ImageEngine(compiled, WORKERS, LOOP, continuous=True, compiled=True),
        ENGINES[1]: ImageEngine(compiled, WORKERS, REQUEST_LEVEL),
        ENGINES[2]: ImageEngine(eager, WORKERS, LOOP, continuous=True),
    }
    graphs = compiled_graphs()
    rounds: dict[str, dict[str, list[dict]]] = {}
    try:
        for engine in engines.values():  # a short load first: threads and allocators
            asyncio.run(closed_loop(engine, 8, 2.0, sizes, seed=-1))
        for index in range(options.rounds):
            for clients in (int(c) for c in options.clients.split(",")):
                order = list(engines) if index % 2 == 0 else list(engines)[::-1]
                for name in order:
                    row = asyncio.run(
                        closed_loop(engines[name], clients, options.duration, sizes, index)
                    )
                    rounds.setdefault(f"c={clients}", {}).setdefault(name, []).append(row)
                    print(f"round {index + 1} c={clients} {name}: {row}", flush=True)
        padding = engines[ENGINES[0]].loop_rows
    finally:
        for engine in engines.values():
            engine.shutdown()
    results = {
        **run_header(sizes, options.duration, options.rounds),
        "start_s": round(start_s, 1),
        "graphs_compiled_at_start": warmup.graphs,
        "graphs_compiled_under_load": compiled_graphs() - graphs,
        "loop_rows": padding,
        "padding_share": round(padding["padding"] / max(padding["rows"], 1), 4),
        "loads": {
            load: {name: _median(rows) for name, rows in by.items()} for load, by in rounds.items()
        },
        "load_rounds": rounds,
    }
    write_json(results, options.out / "loop-compile.json")
    print(markdown(results))
    return 0


def _median(rows: list[dict]) -> dict:
    return {key: round(statistics.median(row[key] for row in rows), 3) for key in rows[0]}


def markdown(results: dict) -> str:
    lines = [
        "| load | engine | steps x px/s | vs request-level + compile | vs loop, eager "
        "| p50 s | p95 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for load, by in results["loads"].items():
        base, eager = by[ENGINES[1]]["step_pixels_per_s"], by[ENGINES[2]]["step_pixels_per_s"]
        for name in ENGINES:
            row = by[name]
            rate = row["step_pixels_per_s"]
            lines.append(
                f"| {load} | {name} | {rate:,.0f} | {rate / base:.2f}x | {rate / eager:.2f}x "
                f"| {row['p50_s']:.3f} | {row['p95_s']:.3f} |"
            )
    lines.append(
        f"\nPadding: {results['padding_share']:.1%} of the compiled loop's forward rows "
        f"({results['loop_rows']['padding']:,} of {results['loop_rows']['rows']:,}); "
        f"graphs compiled at the start: {results['graphs_compiled_at_start']} "
        f"({results['start_s']} s), under load: {results['graphs_compiled_under_load']}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
