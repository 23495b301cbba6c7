"""The ceiling: the bare pipeline in-process, no server, one call at a time per batch size."""

from __future__ import annotations

import time

import torch

from bench.harness.load import PROMPTS, Workload


def measure_bare(
    pipeline, workload: Workload, batch_sizes: list[int], repeats: int = 3
) -> dict[int, dict]:
    """Seconds per call and images/s for each batch size (best of `repeats`)."""
    width, height = (int(side) for side in workload.size.split("x"))

    def call(batch: int) -> float:
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        started = time.perf_counter()
        pipeline(
            prompt=[PROMPTS[i % len(PROMPTS)] for i in range(batch)],
            width=width,
            height=height,
            num_inference_steps=workload.steps,
            generator=generators,
            output_type="np",
        )
        return time.perf_counter() - started

    call(1)  # warm-up
    results = {}
    for batch in batch_sizes:
        seconds = min(call(batch) for _ in range(repeats))
        results[batch] = {
            "s_per_call": round(seconds, 4),
            "images_per_s": round(batch / seconds, 3),
        }
    return results
