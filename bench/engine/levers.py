"""The speed levers on one model, in-process: seconds per pipeline call after warm-up,
replica start-up time, and the denoiser's parameter memory, for
- float32 eager (the baseline),
- regional torch.compile (`optimizations.compile`, warmed up at both sizes),
- int8 weight-only quantization (`optimizations.quantization: int8_weight_only`), eager
  and compiled.

Each variant is loaded and warmed up as a replica would be (`load_pipeline`, then
`prepare_to_serve`), and its calls go through a per-request view with the engine's own call
arguments. Figures are medians of `--repeats` calls; on a shared machine they move.

    python -m bench.engine.levers [--model embedded:tiny-sd3] [--steps 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.generator.calls.call_arguments import pipeline_arguments
from deployments.generator.calls.warmup import prepare_to_serve
from deployments.generator.model.components import denoiser_of
from deployments.generator.model.optimizations import parameter_bytes
from deployments.generator.model.pipelines import RequestPipelines, call_parameters, load_pipeline
from deployments.jobs import GenerationJob

# (width, height, images per call): a small batched size and a large lone image.
SHAPES = [(64, 64, 8), (256, 256, 1)]

VARIANTS = {
    "float32 eager": {},
    "float32 compiled": {"compile": {"warmup_sizes": ["64x64", "256x256"]}},
    "int8 eager": {"quantization": "int8_weight_only"},
    "int8 compiled": {
        "quantization": "int8_weight_only",
        "compile": {"warmup_sizes": ["64x64", "256x256"]},
    },
}


def seconds_per_call(
    pipelines: RequestPipelines, shape: tuple[int, int, int], steps: int, repeats: int
) -> float:
    width, height, images = shape
    job = GenerationJob(
        prompt="a lighthouse at dusk, oil painting",
        negative_prompt=None,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=7.0,
        seeds=tuple(range(images)),
    )

    def call() -> float:
        view = pipelines.view()
        arguments = pipeline_arguments([job], call_parameters(type(view)), lambda *a: a[-1])
        started = time.perf_counter()
        view(**arguments)
        return time.perf_counter() - started

    call()  # the first call at a shape also builds oneDNN's kernels for it
    return statistics.median(call() for _ in range(repeats))


def measure(source: str, label: str, steps: int, repeats: int) -> dict:
    model = ModelConfig(
        id=label, source=source, device="cpu", default_steps=steps, optimizations=VARIANTS[label]
    )
    torch._dynamo.reset()  # each variant starts as a fresh replica process would
    started = time.perf_counter()
    pipeline = load_pipeline(model)
    warmup = prepare_to_serve(pipeline, model, BatchingConfig())
    figures = {
        "start_s": time.perf_counter() - started,
        "graphs": warmup.graphs if warmup else 0,
        "denoiser_bytes": parameter_bytes(denoiser_of(pipeline)),
    }
    pipelines = RequestPipelines(pipeline)
    for shape in SHAPES:
        figures[shape] = seconds_per_call(pipelines, shape, steps, repeats)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:tiny-sd3")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    print(
        f"{args.model}, {args.steps} steps, {torch.get_num_threads()} torch threads, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    results = {
        label: measure(args.model, label, args.steps, args.repeats) for label in args.variants
    }
    columns = [f"{w}x{h} x{n} s/call" for w, h, n in SHAPES]
    print(
        f"{'variant':18} {'start s':>8} {'graphs':>6} {'denoiser KiB':>12} "
        + " ".join(f"{c:>20}" for c in columns)
    )
    base = results.get("float32 eager")
    for label, figures in results.items():
        cells = []
        for shape in SHAPES:
            cell = f"{figures[shape]:.3f}"
            if base is not None and label != "float32 eager":
                cell += f" ({base[shape] / figures[shape]:.2f}x)"
            cells.append(f"{cell:>20}")
        print(
            f"{label:18} {figures['start_s']:8.1f} {figures['graphs']:6d} "
            f"{figures['denoiser_bytes'] / 1024:12.1f} " + " ".join(cells)
        )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
