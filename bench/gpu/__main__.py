"""The GPU benchmark: SD3.5 Medium's architecture (random weights) served by this service on
one CUDA GPU, with each speed lever off and on, and on a replica of 2 and 4 GPUs where the
machine has them.

    python -m bench.gpu                 # one CUDA GPU; about 8 minutes on an H200
    python -m bench.gpu --cpu-smoke     # the same flow at toy scale on a CPU

It builds the model once (bench/gpu/model.py, cached), serves it with the application that
`serve_app.build_app` makes from config/sd3.5-medium.yaml's args, once per lever (eager;
Ulysses context parallelism on 2 and 4 GPUs, each only where torch.cuda.device_count()
allows; the continuous loop; compile; the loop with compile; float8 and int8 weight-only
quantization; the TaylorSeer cache; attention backends are listed as skipped: SD3 takes only
'native'), and
drives it over HTTP on 127.0.0.1: seconds per large image alone, images/s at each
concurrency, the replica's peak GPU memory, and the share of the dense bf16 FLOP floor each
point reaches. What does not fit in the time budget is cut and listed. Results go to
<out>/gpu-latest.json (cpu-smoke.json for the smoke test). Without a CUDA device, and
without --cpu-smoke, it says so and exits with status 2, having measured nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.gpu.flops import derivation
from bench.gpu.model import transformer_config
from bench.gpu.plan import (
    CPU_SMOKE,
    GPU,
    Budget,
    Environment,
    Lever,
    Profile,
    detect_environment,
    levers,
)
from bench.harness.results import RESULTS
from tests.harness import REPO

NO_GPU_EXIT = 2
DEFAULT_PEAK_TFLOPS = 790.0
ASSUMED_H200 = Environment(
    cuda=True,
    capability=(9, 0),
    importable=frozenset({"flash_attn", "torchao"}),
    applies_optimizations=True,
    gpus=1,
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="toy scale on the CPU")
    parser.add_argument("--plan-only", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--levers", nargs="+", help="only these levers (names as planned)")
    parser.add_argument("--budget-s", type=float, help="seconds for building and measuring")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=DEFAULT_PEAK_TFLOPS,
        help="the device's dense bf16 rate for the FLOP floor (TFLOP/s)",
    )
    parser.add_argument("--cache", type=Path, help="where the model is saved (default: cache)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def no_gpu_message() -> str:
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"No CUDA device: torch {torch.__version__} ({build}) sees no GPU. Nothing was "
        "measured and no figure is reported.\nRun it on a machine with a CUDA GPU and a CUDA "
        "build of torch, or check the flow at toy scale with `python -m bench.gpu "
        f"--cpu-smoke`.\nExit status {NO_GPU_EXIT}: skipped, no GPU."
    )


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    profile = CPU_SMOKE if options.cpu_smoke else GPU
    if options.budget_s:
        profile = dataclasses.replace(profile, budget_s=options.budget_s)
    env = detect_environment()
    if not profile.toy and not env.cuda and not options.plan_only:
        print(no_gpu_message(), flush=True)
        return NO_GPU_EXIT
    if options.plan_only and not profile.toy and not env.cuda:
        print(
            "No CUDA device here: planning for one H200 with flash_attn, torchao and the "
            "code that applies `optimizations:` (assumed)."
        )
        env = ASSUMED_H200
    peak = options.peak_tflops if profile.device == "cuda" else None
    config = transformer_config(profile.toy)
    flops: dict[str, int] = {}
    for size in (profile.large, profile.small):
        flops[size], lines = derivation(config, size, profile.steps, peak)
        if size != profile.large:  # the totals only
            lines = [line for line in lines if line.startswith(("FLOPs", "  per", "  floor"))]
        print("\n".join(lines), flush=True)
    chosen, skipped = levers(profile, env)
    if options.levers:
        skipped += [
            (lever.name, "not in --levers") for lever in chosen if lever.name not in options.levers
        ]
        chosen = [lever for lever in chosen if lever.name in options.levers]
    budget = Budget(profile)
    from bench.gpu.report import plan_lines

    print("\n".join(plan_lines(profile, chosen, skipped, budget)), flush=True)
    if options.plan_only:
        return 0
    results = new_results(profile, env, flops, options.peak_tflops, skipped)
    print(f"on {results['machine']['device']}: {results['machine']}", flush=True)
    out = options.out / ("cpu-smoke.json" if profile.toy else "gpu-latest.json")
    source = build_model(profile, options.cache)
    run_levers(profile, chosen, source, budget, results, out, peak)
    from bench.gpu.report import summary_lines

    print("\n".join(summary_lines(results)), flush=True)
    print(f"\nwrote {out}; {time.monotonic() - budget.started:.0f} s in all", flush=True)
    return 0


def new_results(
    profile: Profile,
    env: Environment,
    flops: dict[str, int],
    peak_tflops: float,
    skipped: list[tuple[str, str]],
) -> dict[str, Any]:
    """What the JSON file holds before the first lever: the machine, the plan's inputs."""
    import diffusers
    import torch

    from bench.harness.results import machine

    return {
        "date": datetime.date.today().isoformat(),
        "machine": {**machine(), "cuda": torch.version.cuda, "diffusers": diffusers.__version__},
        "profile": dataclasses.asdict(profile),
        "environment": {**dataclasses.asdict(env), "importable": sorted(env.importable)},
        "transformer_config": transformer_config(profile.toy),
        "large": profile.large,
        "flops_per_image": flops,
        "peak_tflops": peak_tflops,
        "floor_s_per_image": flops[profile.large] / (peak_tflops * 1e12),
        "skipped_levers": skipped,
        "levers": [],
    }


def build_model(profile: Profile, cache: Path | None) -> Path:
    """Build and save the model in a child process (so this one holds no GPU memory)."""
    command = [sys.executable, "-m", "bench.gpu.model", "--device", profile.device]
    command += ["--dtype", profile.dtype, *(["--toy"] if profile.toy else [])]
    command += ["--cache", str(cache)] if cache else []
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the model failed:\n{done.stderr[-3000:]}")
    source = Path(done.stdout.strip().splitlines()[-1])
    print(f"model at {source} ({time.monotonic() - started:.0f} s)", flush=True)
    return source


def run_levers(
    profile: Profile,
    chosen: list[Lever],
    source: Path,
    budget: Budget,
    results: dict[str, Any],
    out: Path,
    peak: float | None,
) -> None:
    from bench.gpu.lever import run_lever
    from bench.gpu.serve import Stack
    from bench.harness.results import write_json

    with Stack(profile) as stack:
        for lever in chosen:
            record = run_lever(stack, lever, source, budget, results, peak)
            results["levers"].append(record)
            write_json(results, out)


if __name__ == "__main__":
    sys.exit(main())
