"""Does a pipeline call in a worker thread get faster with more torch threads?

    python -m bench.threads

A replica runs every pipeline call in a worker thread. This measures the bare pipeline's
seconds per call (best of 3) from the main thread and from a fresh worker thread, with 1 torch
thread and with every core, and writes bench/results/threads.json.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import torch

from bench.bare import measure_bare
from bench.load import Workload
from deployments.generator.pipelines import load_pipeline
from deployments.model_config import ModelConfig

CASES = [("64x64", 1), ("64x64", 4), ("256x256", 1)]
OUT = Path(__file__).resolve().parent / "results" / "threads.json"


def seconds_per_call(pipeline, size: str, batch: int, threads: int, in_worker: bool) -> float:
    """Best of 3 calls (after a warm-up) with `threads` torch threads, set by the thread that
    calls, in the main thread or in a worker thread started for it."""
    result: dict[str, float] = {}

    def run() -> None:
        torch.set_num_threads(threads)
        rows = measure_bare(pipeline, Workload("case", size, steps=8), [batch], repeats=3)
        result["s"] = rows[batch]["s_per_call"]

    if in_worker:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    else:
        run()
    return result["s"]


def main() -> int:
    cores = os.cpu_count() or 1
    pipeline = load_pipeline(ModelConfig(device="cpu", dtype="float32"))
    rows = []
    for size, batch in CASES:
        for where in ("main thread", "worker thread"):
            for threads in sorted({1, cores}):
                seconds = seconds_per_call(pipeline, size, batch, threads, where != "main thread")
                rows.append(
                    {"size": size, "batch": batch, "where": where, "threads": threads, "s": seconds}
                )
                print(
                    f"{size} batch {batch}, {where}, {threads} threads: {seconds:.3f} s", flush=True
                )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"cores": cores, "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
