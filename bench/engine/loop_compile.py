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

import sys
import time

import torch

from bench.engine.lever_loads import (
    LOOP,
    REQUEST_LEVEL,
    WORKERS,
    medians,
    options_parser,
    parsed,
    run_rounds,
    table,
)
from bench.harness.results import run_header, write_json
from deployments.config.model_config import ModelConfig
from deployments.config.optimizations_config import CompileConfig
from deployments.generator.calls.warmup import compiled_graphs, prepare_to_serve
from deployments.generator.engine import ImageEngine
from deployments.generator.model.pipelines import load_pipeline
from deployments.generator.model.torch_threads import cpu_threads_per_call

ENGINES = ("loop + compile", "request-level + compile", "loop, eager")


def main(argv: list[str] | None = None) -> int:
    options = parsed(options_parser(__doc__.split("\n\n")[0]), argv)
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
    rounds = run_rounds(engines, options, sizes)
    padding = engines[ENGINES[0]].loop_rows
    results = {
        **run_header(sizes, options.duration, options.rounds),
        "start_s": round(start_s, 1),
        "graphs_compiled_at_start": warmup.graphs,
        "graphs_compiled_under_load": compiled_graphs() - graphs,
        "loop_rows": padding,
        "padding_share": round(padding["padding"] / max(padding["rows"], 1), 4),
        "loads": medians(rounds),
        "load_rounds": rounds,
    }
    write_json(results, options.out / "loop-compile.json")
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = table(results["loads"], ENGINES)
    lines.append(
        f"\nPadding: {results['padding_share']:.1%} of the compiled loop's forward rows "
        f"({results['loop_rows']['padding']:,} of {results['loop_rows']['rows']:,}); "
        f"graphs compiled at the start: {results['graphs_compiled_at_start']} "
        f"({results['start_s']} s), under load: {results['graphs_compiled_under_load']}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
