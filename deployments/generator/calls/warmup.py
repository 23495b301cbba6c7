"""A replica's start with optimizations: compile, and run every shape it is set to serve,
before it reports ready.

Serve sends a replica requests once its constructor returns. `torch.compile` compiles at the
first call at each new shape (seconds to minutes), so without a warm-up the first requests
would pay for it, and every request batched with them too. So the constructor compiles the
denoiser's blocks and runs each warm-up shape (each size at each batch size) through a real
pipeline view with the engine's own call arguments: the same guards, hence the same graphs.
Afterwards a request at a warmed shape compiles nothing; one at a shape that was not warmed
compiles at its first call, and a warning says so. Where the model's text-to-image jobs run
in the continuous loop, its forwards are warmed too: one at each row count the loop pads a
step to, at each warm-up size (`deployments/generator/loop/row_buckets.py`).

Without `compile`, any other option still gets one small call at start, so an option that
loads but cannot run here fails the start, not the first request.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from torch._dynamo.callback import callback_handler, on_compile_end
from torch._dynamo.utils import counters

from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.config.optimizations_config import CompileConfig
from deployments.generator.calls.call_arguments import pipeline_arguments
from deployments.generator.loop.families import family_of
from deployments.generator.loop.row_buckets import warm_up
from deployments.generator.model.components import denoiser_of
from deployments.generator.model.optimizations import OptimizationUnavailable, compile_blocks
from deployments.generator.model.pipelines import RequestPipelines, call_parameters
from deployments.jobs import GenerationJob

logger = logging.getLogger("ray.serve")

# Denoising steps of a warm-up call: every step runs the same graphs, and two take the
# scheduler past its first step.
WARMUP_STEPS = 2


@dataclass(frozen=True)
class WarmupShape:
    width: int
    height: int
    images: int


@dataclass(frozen=True)
class Warmup:
    """What a replica's start did: the shapes it ran, its time, the graphs it compiled."""

    shapes: list[WarmupShape]
    seconds: float
    graphs: int
    # The continuous loop's forwards: (width, height, rows) each.
    loop_shapes: list[tuple[int, int, int]] = field(default_factory=list)


def warmup_shapes(
    model: ModelConfig, batching: BatchingConfig, config: CompileConfig
) -> list[WarmupShape]:
    """Each warm-up size (by default the model's default size) at each warm-up batch size (by
    default 1 and the largest call batching makes at that size), smaller batches first."""
    shapes = []
    for size in config.warmup_sizes or [model.default_size]:
        width, height = (int(side) for side in size.split("x"))
        largest = batching.images_per_batch(width, height)
        for images in config.warmup_batch_sizes or sorted({1, largest}):
            shapes.append(WarmupShape(width, height, images))
    return shapes


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    return int(counters["stats"]["unique_graphs"])


def prepare_to_serve(
    pipeline: Any,
    model: ModelConfig,
    batching: BatchingConfig,
    compile_backend: str = "inductor",
    continuous: bool = False,
) -> Warmup | None:
    """Compile the shared pipeline's denoiser if `model.optimizations` says so and run the
    warm-up calls (and with `continuous`, the loop's forwards); with other options only, one
    small call. None when no option is set. Raises `OptimizationUnavailable` naming the
    options set if a call fails."""
    options = model.optimizations
    config = options.compile_config
    enabled = ", ".join(options.model_dump(exclude_defaults=True))
    if config is not None:
        compile_blocks(denoiser_of(pipeline), config, compile_backend)
        shapes, steps = warmup_shapes(model, batching, config), WARMUP_STEPS
    elif enabled:
        width, height = (int(side) for side in model.default_size.split("x"))
        shapes, steps = [WarmupShape(width, height, 1)], 1
    else:
        return None
    started, graphs = time.perf_counter(), compiled_graphs()
    pipelines = RequestPipelines(pipeline)
    for shape in shapes:
        try:
            _call(pipelines, model, shape, min(steps, model.default_steps))
        except Exception as error:
            # Named all: which of them broke the call, its message says better than a guess.
            raise OptimizationUnavailable(
                enabled,
                f"the start-up call at {shape.width}x{shape.height}, {shape.images} image(s) "
                f"failed: {type(error).__name__}: {error}",
            ) from error
    loop_shapes = []
    if config is not None and continuous:
        loop_shapes = _warm_loop(pipelines, model, batching, shapes, enabled)
    warmup = Warmup(shapes, time.perf_counter() - started, compiled_graphs() - graphs, loop_shapes)
    logger.info(
        "%s ready (%s) after %.1f s of warm-up calls: %s%s; %d graphs compiled",
        model.id,
        enabled,
        warmup.seconds,
        ", ".join(f"{s.width}x{s.height} x{s.images}" for s in shapes),
        "".join(f", loop {w}x{h} {rows} rows" for w, h, rows in loop_shapes),
        warmup.graphs,
    )
    if config is not None:
        _watch.serving()
    return warmup


def _call(pipelines: RequestPipelines, model: ModelConfig, shape: WarmupShape, steps: int) -> None:
    """One pipeline call as the engine makes it for a text-to-image job of this shape."""
    job = GenerationJob(
        prompt="warm-up",
        negative_prompt=None,
        width=shape.width,
        height=shape.height,
        num_inference_steps=steps,
        # Guidance decides the denoiser's batch (classifier-free guidance doubles it).
        guidance_scale=model.default_guidance_scale,
        seeds=tuple(range(shape.images)),
        request_id="warm-up",
    )
    view = pipelines.view()
    view(**pipeline_arguments([job], call_parameters(type(view)), _each_step))


def _warm_loop(
    pipelines: RequestPipelines,
    model: ModelConfig,
    batching: BatchingConfig,
    shapes: list[WarmupShape],
    enabled: str,
) -> list[tuple[int, int, int]]:
    """The continuous loop's forward at each row count it pads to, at each warm-up size;
    nothing where the loop does not run this pipeline's family."""
    family = family_of(pipelines.view())
    if family is None:
        return []
    done: list[tuple[int, int, int]] = []
    for width, height in dict.fromkeys((shape.width, shape.height) for shape in shapes):
        images = batching.images_per_batch(width, height)
        try:
            rows = warm_up(family, width, height, images, model.default_guidance_scale)
        except Exception as error:
            raise OptimizationUnavailable(
                enabled,
                f"the continuous loop's start-up forwards at {width}x{height} failed: "
                f"{type(error).__name__}: {error}",
            ) from error
        done += [(width, height, count) for count in rows]
    return done


def _each_step(_pipeline: Any, _step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict:
    # The engine always passes a step callback; so does the warm-up, for the same call path.
    return kwargs


class _CompileWatch:
    """Logs a warning for each compilation once a replica is serving: a request at a shape
    that was not warmed up is paying for it (and so is its batch)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def serving(self) -> None:
        with self._lock:
            # Registered once; again if `torch._dynamo.reset()` dropped every callback (tests
            # reset dynamo between compiled pipelines).
            if self._compiled not in callback_handler.end_callbacks:
                on_compile_end(self._compiled)

    def _compiled(self, *_args: Any) -> None:
        logger.warning(
            "torch.compile compiled a new graph while serving: a request's shape (size, "
            "images per call or guidance) was not warmed up; add it to "
            "optimizations.compile.warmup_sizes / warmup_batch_sizes"
        )


_watch = _CompileWatch()
