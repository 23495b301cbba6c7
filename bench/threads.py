"""Does it matter which threads of a process run torch? (It does, on a CPU: see
`deployments/generator/torch_threads.py`.)

    python -m bench.threads

Each case runs in a fresh process: the bare pipeline (8 steps) loaded and called only from
the main thread; loaded and called only from one other thread; and called from another
thread after the main thread ran one small parallel op (what a replica did when it loaded
in its constructor's thread and generated in a worker). Each with 1 torch thread and with
every core; seconds per call, best of 4. Writes bench/results/threads.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

CASES = {
    "main thread only": "main",
    "one other thread only": "thread",
    "main thread first, then another": "main-then-thread",
}
SHAPES = [("64x64", 1), ("64x64", 8), ("256x256", 1)]
OUT = Path(__file__).resolve().parent / "results" / "threads.json"


def measure(where: str, threads: int) -> dict[str, float]:
    """In this process: seconds per call of each shape, torch run where `where` says."""
    import torch

    from bench.bare import measure_bare
    from bench.load import Workload
    from deployments.generator.pipelines import load_pipeline
    from deployments.model_config import ModelConfig

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


def main() -> int:
    if len(sys.argv) == 3:  # one case, in a child process
        print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
        return 0
    cores = os.cpu_count() or 1
    rows = []
    for label, where in CASES.items():
        for threads in sorted({1, cores}):
            child = subprocess.run(
                [sys.executable, "-m", "bench.threads", where, str(threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            seconds = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append({"where": label, "threads": threads, "s_per_call": seconds})
            shown = ", ".join(f"{shape} {s:.3f} s" for shape, s in seconds.items())
            print(f"{label}, {threads} torch threads: {shown}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"cores": cores, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
