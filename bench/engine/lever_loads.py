"""What the in-process lever benchmarks of the continuous loop share (`loop_compile`,
`loop_cache`): `bench.serving.continuous`'s mix as engine jobs, closed-loop clients, rounds
over several engines in alternating order, their medians and their table.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness.results import RESULTS
from bench.serving.continuous import MixedWorkload, workload
from deployments.config.model_config import BatchingConfig
from deployments.generator.engine import ImageEngine
from deployments.jobs import GenerationJob

# Each engine's worker threads, one torch thread each, as a replica on this 2-core machine.
WORKERS = 2
LOOP = BatchingConfig(continuous=True)
REQUEST_LEVEL = BatchingConfig(continuous=False)


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


def options_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", default="64,128", help="square sides of the mix")
    parser.add_argument("--clients", default="8,16")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round of 5 s loads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def parsed(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    options = parser.parse_args(argv)
    if options.quick:
        options.rounds, options.duration = 1, 5.0
    return options


def run_rounds(
    engines: dict[str, ImageEngine],
    options: argparse.Namespace,
    sizes: tuple[int, ...],
    measured: Callable[[str], Callable[[], dict]] | None = None,
) -> dict[str, dict[str, list[dict]]]:
    """Every engine at every load, `options.rounds` times, in alternating order; each row
    with what `measured(name)` returns (started before the load, read after it). Shuts the
    engines down."""
    rounds: dict[str, dict[str, list[dict]]] = {}
    try:
        for engine in engines.values():  # a short load first: threads and allocators
            asyncio.run(closed_loop(engine, 8, 2.0, sizes, seed=-1))
        for index in range(options.rounds):
            for clients in (int(c) for c in options.clients.split(",")):
                order = list(engines) if index % 2 == 0 else list(engines)[::-1]
                for name in order:
                    extra = measured(name) if measured is not None else dict
                    row = asyncio.run(
                        closed_loop(engines[name], clients, options.duration, sizes, index)
                    )
                    row.update(extra())
                    rounds.setdefault(f"c={clients}", {}).setdefault(name, []).append(row)
                    print(f"round {index + 1} c={clients} {name}: {row}", flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
    return rounds


def medians(rounds: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    return {load: {name: _median(rows) for name, rows in by.items()} for load, by in rounds.items()}


def _median(rows: list[dict]) -> dict:
    return {key: round(statistics.median(row[key] for row in rows), 4) for key in rows[0]}


def table(
    loads: dict[str, dict[str, dict]],
    engines: tuple[str, str, str],
    extra: tuple[str, Callable[[dict], str]] | None = None,
) -> list[str]:
    """The markdown rows: each engine's rate against the second and the third engine's."""
    _, base_name, other_name = engines
    extra_head = f" {extra[0]} |" if extra else ""
    lines = [
        f"| load | engine | steps x px/s | vs {base_name} | vs {other_name} |{extra_head}"
        " p50 s | p95 s |",
        "|---|---|---|---|---|" + ("---|" if extra else "") + "---|---|",
    ]
    for load, by in loads.items():
        base = by[base_name]["step_pixels_per_s"]
        other = by[other_name]["step_pixels_per_s"]
        for name in engines:
            row = by[name]
            rate = row["step_pixels_per_s"]
            cell = f" {extra[1](row)} |" if extra else ""
            lines.append(
                f"| {load} | {name} | {rate:,.0f} | {rate / base:.2f}x | {rate / other:.2f}x "
                f"|{cell} {row['p50_s']:.3f} | {row['p95_s']:.3f} |"
            )
    return lines
