"""Does it matter which threads of a process run torch? (It does, on a CPU: see
`deployments/generator/model/torch_threads.py`.)

    python -m bench.engine.threads

Each case runs in a fresh process: the bare pipeline (8 steps) loaded and called only from
the main thread; loaded and called only from one other thread; and called from another
thread after the main thread ran one small parallel op (what a replica did when it loaded
in its constructor's thread and generated in a worker). Each with 1 torch thread and with
every core; seconds per call, best of 4. Writes bench/results/threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading

from bench.harness.results import RESULTS, write_json

CASES = {
    "main thread only": "main",
    "one other thread only": "thread",
    "main thread first, then another": "main-then-thread",
}
SHAPES = [("64x64", 1), ("64x64", 8), ("256x256", 1)]
OUT = RESULTS / "threads.json"


def measure(where: str, threads: int) -> dict[str, float]:
    """In this process: seconds per call of each shape, torch run where `where` says."""
    import torch

    from bench.harness.load import Workload
    from bench.serving.bare import measure_bare
    from deployments.config.model_config import ModelConfig
    from deployments.generator.model.pipelines import load_pipeline

    result: dict[str, float] = {}

    def work() -> None:
        torch.set_num_threads(threads)
        pipeline = load_pipeline(ModelConfig(device="cpu", dtype="float32"))
        for size, batch in SHAPES:
            rows = measure_bare(pipeline, Workload("case", size, steps=8), [batch], repeats=4)
            result[f"{size} x{batch}"] = rows[batch]["s_per_call"]

    if where == "main":
        work()
        return result
    if where == "main-then-thread":
        torch.set_num_threads(threads)
        torch.ones(256, 256) @ torch.ones(256, 256)  # the main thread's OpenMP team exists
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Each case runs in a child process started with these two: where torch runs, and with
    # how many threads (a fresh process, so no OpenMP team is left from another case).
    parser.add_argument("where", nargs="?", choices=list(CASES.values()), help=argparse.SUPPRESS)
    parser.add_argument("threads", nargs="?", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.where is not None and options.threads is not None:  # one case, in a child
        print(json.dumps(measure(options.where, options.threads)))
        return 0
    cores = os.cpu_count() or 1
    rows = []
    for label, where in CASES.items():
        for threads in sorted({1, cores}):
            child = subprocess.run(
                [sys.executable, "-m", "bench.engine.threads", where, str(threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            seconds = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append({"where": label, "threads": threads, "s_per_call": seconds})
            shown = ", ".join(f"{shape} {s:.3f} s" for shape, s in seconds.items())
            print(f"{label}, {threads} torch threads: {shown}", flush=True)
    write_json({"cores": cores, "rows": rows}, OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
