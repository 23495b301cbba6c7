"""Caches inside the continuous loop: the loop with the model's cache decided per image
against request-level batches with diffusers' cache on the same denoiser, and against the
loop without a cache, with how much of the cached modules' work each skipped.

    python -m bench.engine.loop_cache                  # both cases below, a result file each
    python -m bench.engine.loop_cache --case tiny-sd3/taylorseer --quick

The cases (`bench/results/loop-cache-<model>-<kind>.json`): First-Block-Cache on tiny-flux
(threshold 0.5; FLUX is the loop's family whose blocks diffusers' cache knows) and TaylorSeer
on tiny-sd3 (a step of every 3 computes after 2 warm-up steps, factors in float32). In this
process, no server, as `bench.engine.loop_compile`: one pipeline with the cache serves the
loop and request-level batches in turn; a second, uncached one serves the loop without a
cache. Each engine has two worker threads, one torch thread each, as a replica on this
2-core machine. The workload is `bench.serving.continuous`'s mix without adapters, in
closed loops of 8 and 16 clients, the engines in alternating order each round. Throughput
is steps x pixels per second. "Skipped" is the share of the rows entering the denoiser that
did not run through the last module the cache hooks (`CachedRows`).

A cache is lossy and what First-Block-Cache skips depends on the weights: the embedded
models' are random, so its skip share at a threshold says nothing of a trained model's;
the comparison that holds is the loop's against request-level batches with the same cache.
TaylorSeer decides from the step alone.
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
CASES = {
    "tiny-flux/first_block": CacheConfig(kind="first_block", threshold=0.5),
    "tiny-sd3/taylorseer": CacheConfig(
        kind="taylorseer",
        options={
            "cache_interval": 3,
            "disable_cache_before_step": 2,
            "taylor_factors_dtype": "float32",
        },
    ),
}
# The prefix of the names of the per-image cache hooks (`deployments/generator/loop/caches/`).
_PER_IMAGE_HOOKS = "image_service_per_image"


class CachedRows:
    """The rows that enter a cached denoiser, and those that run through the last module
    the loop's per-image cache hooks (at its first Linear layer, which sees the rows the
    module really runs): fewer where images skipped it or predicted it, on either path."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        hooked = [
            module
            for module in denoiser.modules()
            if any(
                name.startswith(_PER_IMAGE_HOOKS)
                for name in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})
            )
        ]
        # Inside it: a hooked Linear (TaylorSeer's lite mode) counts at its call, not its run.
        linear = next(m for m in hooked[-1].modules() if isinstance(m, torch.nn.Linear))
        self.entered = self.through = 0
        self._hooks = [
            denoiser.register_forward_pre_hook(self._count_entering, with_kwargs=True),
            linear.register_forward_pre_hook(self._count_through),
        ]

    def _count_entering(self, _module, _args, kwargs) -> None:
        self.entered += kwargs["hidden_states"].shape[0]

    def _count_through(self, _module, args) -> None:
        self.through += args[0].shape[0]

    def skipped_since(self, entered: int, through: int) -> float:
        rows = self.entered - entered
        return round(1 - (self.through - through) / rows, 4) if rows else 0.0

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def parse_options(argv: list[str] | None):
    parser = lever_loads.options_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=list(CASES), action="append")
    return lever_loads.parsed(parser, argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    sizes = tuple(int(side) for side in options.sizes.split(","))
    torch.set_num_threads(cpu_threads_per_call(WORKERS))
    for case in options.case or list(CASES):
        results = measure(case, options, sizes)
        name = case.replace("/", "-")
        write_json(results, options.out / f"loop-cache-{name}.json")
        print(markdown(results))
    return 0


def measure(case: str, options, sizes: tuple[int, ...]) -> dict:
    family, _ = case.split("/")
    cache = CASES[case]
    model = ModelConfig(
        id=family,
        source=f"embedded:{family}",
        device="cpu",
        default_size=f"{sizes[0]}x{sizes[0]}",
        optimizations={"cache": cache},
    )
    cached = load_pipeline(model)
    apply_cache(cached, model)
    plain = load_pipeline(model.model_copy(update={"optimizations": OptimizationsConfig()}))
    engines = {
        ENGINES[0]: ImageEngine(cached, WORKERS, LOOP, continuous=True),
        ENGINES[1]: ImageEngine(cached, WORKERS, REQUEST_LEVEL),
        ENGINES[2]: ImageEngine(plain, WORKERS, LOOP, continuous=True),
    }
    counted = CachedRows(denoiser_of(cached))

    def skipped(name: str):
        if name == ENGINES[2]:
            return lambda: {"skipped": 0.0}
        entered, through = counted.entered, counted.through
        return lambda: {"skipped": counted.skipped_since(entered, through)}

    rounds = lever_loads.run_rounds(engines, options, sizes, skipped)
    counted.remove()
    return {
        **run_header(sizes, options.duration, options.rounds),
        "model": family,
        "cache": cache.model_dump(),
        "loads": lever_loads.medians(rounds),
        "load_rounds": rounds,
    }


def markdown(results: dict) -> str:
    lines = lever_loads.table(
        results["loads"], ENGINES, ("skipped", lambda row: f"{row['skipped']:.1%}")
    )
    return f"{results['model']}, {results['cache']['kind']}:\n" + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
