"""Seconds of one pipeline call by size, steps and images in the call: the service times
the simulation runs on, measured on a real engine (or taken from published GPU figures).

A call costs `fixed_s` (prompt encoding, the VAE's decode, the call's own overhead) plus
`per_step_s` per denoising step, both for a given size and number of images; between
measured batch sizes both are interpolated linearly, and beyond the largest they grow in
proportion to the images.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CallCost:
    fixed_s: float
    per_step_s: float

    def seconds(self, steps: int) -> float:
        return self.fixed_s + steps * self.per_step_s


@dataclass(frozen=True)
class ServiceModel:
    """Call costs by (size, images in the call); `source` says where they come from."""

    costs: dict[tuple[str, int], CallCost]
    source: str
    # Seconds a request spends outside the replica (proxy, ingress, encoding the images,
    # the client's own handling), added to its latency; it holds no replica.
    request_overhead_s: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    # How calls and overheads vary around their means, where measured (a run's probe): each
    # call's seconds times one of `call_spread` (mean 1), each request's overhead one of
    # `overheads`, drawn at random. Empty: every call its mean, every overhead the constant.
    call_spread: tuple[float, ...] = ()
    overheads: tuple[float, ...] = ()

    def cost(self, size: str, images: int) -> CallCost:
        measured = sorted(batch for s, batch in self.costs if s == size)
        if not measured:
            raise KeyError(f"no service time measured at {size}")
        if images in measured:
            return self.costs[(size, images)]
        if images > measured[-1]:
            largest = self.costs[(size, measured[-1])]
            scale = images / measured[-1]
            return CallCost(largest.fixed_s * scale, largest.per_step_s * scale)
        below = max(b for b in measured if b < images) if images > measured[0] else measured[0]
        above = min(b for b in measured if b > images)
        low, high = self.costs[(size, below)], self.costs[(size, above)]
        share = (images - below) / (above - below)
        return CallCost(
            low.fixed_s + share * (high.fixed_s - low.fixed_s),
            low.per_step_s + share * (high.per_step_s - low.per_step_s),
        )

    def call_s(self, size: str, steps: int, images: int) -> float:
        return self.cost(size, images).seconds(steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "request_overhead_s": self.request_overhead_s,
            "notes": self.notes,
            "calls": [
                {"size": size, "images": images, "fixed_s": c.fixed_s, "per_step_s": c.per_step_s}
                for (size, images), c in sorted(self.costs.items())
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceModel:
        costs = {
            (call["size"], call["images"]): CallCost(call["fixed_s"], call["per_step_s"])
            for call in data["calls"]
        }
        return cls(
            costs=costs,
            source=data["source"],
            request_overhead_s=data.get("request_overhead_s", 0.0),
            notes=data.get("notes", {}),
        )

    @classmethod
    def load(cls, path: Path) -> ServiceModel:
        return cls.from_json(json.loads(path.read_text()))

    def with_overhead(self, request_overhead_s: float) -> ServiceModel:
        return ServiceModel(self.costs, self.source, request_overhead_s, self.notes)

    def with_spread(self, call_spread: list[float], overheads: list[float]) -> ServiceModel:
        """These costs, each call's seconds and each request's overhead drawn from measured
        samples (`call_spread`: ratios, rescaled here to a mean of 1)."""
        mean = sum(call_spread) / len(call_spread) if call_spread else 1.0
        spread = tuple(ratio / mean for ratio in call_spread)
        return ServiceModel(
            self.costs, self.source, self.request_overhead_s, self.notes, spread, tuple(overheads)
        )

    def overhead_s(self, draw: random.Random) -> float:
        """One request's overhead: a measured one at random, else the constant."""
        return draw.choice(self.overheads) if self.overheads else self.request_overhead_s

    def spread(self, draw: random.Random) -> float:
        """One call's seconds over its mean: a measured ratio at random, else 1."""
        return draw.choice(self.call_spread) if self.call_spread else 1.0


def measure_engine(
    sizes: Sequence[str],
    batches: Sequence[int],
    steps: tuple[int, int] = (2, 10),
    repeats: int = 3,
) -> ServiceModel:
    """Call costs of the embedded tiny-sd3 on this machine's CPU, through the real engine:
    one worker thread with one torch thread, as a replica of half a CPU runs
    (`cpu_threads_per_call`). Each point is the median `generate_s` of `repeats` calls of
    `images` images; `fixed_s` and `per_step_s` come from the two step counts."""
    import torch

    from deployments.config.model_config import BatchingConfig, ModelConfig
    from deployments.generator.engine import ImageEngine
    from deployments.generator.model.pipelines import load_pipeline
    from deployments.jobs import GenerationJob

    pool = ThreadPoolExecutor(1, thread_name_prefix="generate")
    pool.submit(torch.set_num_threads, 1).result()
    pipeline = pool.submit(load_pipeline, ModelConfig(device="cpu")).result()
    batching = BatchingConfig(max_batch_images=max(batches), max_batch_pixels=2**30, max_wait_ms=0)
    engine = ImageEngine(pipeline, worker_threads=1, batching=batching, pool=pool)

    def one_call(size: str, step_count: int, images: int) -> float:
        # One job of `images` images is one call of them: the cost of a batch of `images`
        # single-image jobs (a batch is one call over its jobs' images).
        width, height = (int(side) for side in size.split("x"))
        job = GenerationJob(
            prompt="a lighthouse on a cliff at dusk",
            negative_prompt=None,
            width=width,
            height=height,
            num_inference_steps=step_count,
            guidance_scale=7.0,
            seeds=tuple(range(images)),
        )
        result = asyncio.run(engine.generate(job))
        assert result.batch_images == images, "the images did not run in one call"
        return result.generate_s

    costs: dict[tuple[str, int], CallCost] = {}
    started = time.time()
    try:
        one_call(sizes[0], steps[0], 1)  # warm-up
        for size in sizes:
            for images in batches:
                low, high = (
                    statistics.median(one_call(size, count, images) for _ in range(repeats))
                    for count in steps
                )
                per_step = max(0.0, (high - low) / (steps[1] - steps[0]))
                costs[(size, images)] = CallCost(
                    fixed_s=round(max(0.0, low - steps[0] * per_step), 5),
                    per_step_s=round(per_step, 5),
                )
    finally:
        engine.shutdown()
    return ServiceModel(
        costs=costs,
        source="measured: embedded tiny-sd3, CPU, 1 worker thread x 1 torch thread",
        notes={
            "steps": list(steps),
            "repeats": repeats,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "measure_s": round(time.time() - started, 1),
        },
    )
