"""First-Block-Cache inside the continuous loop: the loop with the cache decided per image
against request-level batches with diffusers' cache on the same denoiser, and against the
loop without a cache, with how much of the denoiser's block work each skipped.

    python -m bench.engine.loop_cache            # writes bench/results/loop-cache.json
    python -m bench.engine.loop_cache --quick    # one round of 5 s loads

In this process, no server, as `bench.engine.loop_compile`: one tiny-flux pipeline with
`optimizations.cache: {kind: first_block, threshold}` (FLUX is the loop's family whose blocks
diffusers' cache knows) serves the loop and request-level batches in turn; a second,
uncached one serves the loop without a cache. Each engine has two worker threads, one torch
thread each, as a replica on this 2-core machine. The workload is `bench.serving.continuous`'s
mix without adapters, in closed loops of 8 and 16 clients, the engines in alternating order
each round. Throughput is steps x pixels per second. "Skipped" is the share of the rows
entering the first transformer block that did not run the last one (counted inside both).

A cache is lossy and its skips depend on the weights: the embedded model's are random, so
what it skips at a threshold says nothing of a trained model's; the comparison that holds is
the loop's against request-level batches at the same threshold.
"""

from __future__ import annotations

import sys

import torch

from bench.engine import lever_loads
from bench.engine.lever_loads import LOOP, REQUEST_LEVEL, WORKERS
from bench.harness.results import run_header, write_json
from deployments.config.model_config import ModelConfig
from deployments.config.optimizations_config import CacheConfig, OptimizationsConfig
from deployments.generator.engine import ImageEngine
from deployments.generator.model.cache_hooks import apply_cache
from deployments.generator.model.components import denoiser_of
from deployments.generator.model.pipelines import load_pipeline
from deployments.generator.model.torch_threads import cpu_threads_per_call

ENGINES = ("loop + cache", "request-level + cache", "loop, no cache")


class BlockRows:
    """Rows through the denoiser's first and last transformer block (at the first Linear
    layer inside each, which sees the rows the block really runs)."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        blocks = [
            module
            for name, module in denoiser.named_modules()
            if name.count(".") == 1 and name.split(".")[0].endswith("transformer_blocks")
        ]
        self.first = self.last = 0
        for block, which in ((blocks[0], "first"), (blocks[-1], "last")):
            linear = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
            linear.register_forward_pre_hook(self._counter(which))

    def _counter(self, which: str):
        def count(_module, args) -> None:
            setattr(self, which, getattr(self, which) + args[0].shape[0])

        return count

    def skipped_since(self, first: int, last: int) -> float:
        entered = self.first - first
        return round(1 - (self.last - last) / entered, 4) if entered else 0.0


def parse_options(argv: list[str] | None):
    parser = lever_loads.options_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--threshold", type=float, default=0.5)
    return lever_loads.parsed(parser, argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    sizes = tuple(int(side) for side in options.sizes.split(","))
    torch.set_num_threads(cpu_threads_per_call(WORKERS))
    model = ModelConfig(
        id="tiny-flux",
        source="embedded:tiny-flux",
        device="cpu",
        default_size=f"{sizes[0]}x{sizes[0]}",
        optimizations={"cache": CacheConfig(kind="first_block", threshold=options.threshold)},
    )
    cached = load_pipeline(model)
    apply_cache(cached, model)
    plain = load_pipeline(model.model_copy(update={"optimizations": OptimizationsConfig()}))
    engines = {
        ENGINES[0]: ImageEngine(cached, WORKERS, LOOP, continuous=True),
        ENGINES[1]: ImageEngine(cached, WORKERS, REQUEST_LEVEL),
        ENGINES[2]: ImageEngine(plain, WORKERS, LOOP, continuous=True),
    }
    counted = {id(cached): BlockRows(denoiser_of(cached)), id(plain): BlockRows(denoiser_of(plain))}
    pipelines = {ENGINES[0]: cached, ENGINES[1]: cached, ENGINES[2]: plain}

    def skipped(name: str):
        rows = counted[id(pipelines[name])]
        first, last = rows.first, rows.last
        return lambda: {"skipped": rows.skipped_since(first, last)}

    rounds = lever_loads.run_rounds(engines, options, sizes, skipped)
    results = {
        **run_header(sizes, options.duration, options.rounds),
        "model": "tiny-flux",
        "cache": {"kind": "first_block", "threshold": options.threshold},
        "loads": lever_loads.medians(rounds),
        "load_rounds": rounds,
    }
    write_json(results, options.out / "loop-cache.json")
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    return "\n".join(
        lever_loads.table(results["loads"], ENGINES, ("skipped", lambda r: f"{r['skipped']:.1%}"))
    )


if __name__ == "__main__":
    sys.exit(main())
