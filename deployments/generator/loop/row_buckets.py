"""A compiled denoiser in the continuous loop: each step's transformer batch padded up to one
of a few row counts, every one of them compiled before the replica reports ready.

The loop's forward holds a row for each image in flight, and one more for each image with
classifier-free guidance: any count from 1 to twice a step's image budget, changing nearly
every step. `torch.compile` compiles at a shape it has not run, and what a compiled shape
costs depends on the mode: with torch's default, a batch dimension seen to change is made
symbolic at its second value, so one more graph serves every count; a CUDA-graph mode
(`reduce-overhead`) records a graph per count and `max-autotune` tunes one. Left to the
traffic, the first step at each new count would compile while requests wait behind it.

So with `optimizations.compile` a lane rounds its forward's rows up to a bucket, a power of
two or the largest count (1, 2, 4, 8, 16 for 8 images a step with guidance; FLUX, whose
guidance is an input, holds a row an image: 1, 2, 4, 8), and the replica's start runs
one forward at each bucket at each warm-up size (`warm_up`, from
`deployments/generator/calls/warmup.py`). Afterwards the loop compiles nothing at a warmed
size (`tests/pipeline/test_loop_compile.py` counts the graphs).

A padding row is a copy of the step's first image's conditional row (its latents, its
timestep, its prompt), computed and dropped: nobody reads its output, and no image's own
rows change (a transformer computes each row apart; the other rows only change which
kernels the batch takes, the tolerance of batched float32). Its price is compute: a step of
`r` rows runs `bucket(r) - r` more, at most just under half of them (5 rows run as 8);
`python -m bench.serving.continuous` prints what they cost.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from deployments.generator.calls.call_plan import is_out_of_memory
from deployments.generator.loop.families import FlowFamily, ImageState

logger = logging.getLogger("ray.serve")

# Denoising steps of a warm-up image: a forward at its first step is all that compiles.
_WARMUP_STEPS = 2


def row_buckets(images_per_step: int, rows_per_image: int = 2) -> list[int]:
    """The row counts a step's forward is padded to: the powers of two below the most rows
    a step can hold (`rows_per_image` for each of `images_per_step` images: two with
    classifier-free guidance), and that."""
    most = rows_per_image * images_per_step
    buckets, rows = [], 1
    while rows < most:
        buckets.append(rows)
        rows *= 2
    return [*buckets, most]


def padded(family: FlowFamily, images: list[ImageState], images_per_step: int) -> list[ImageState]:
    """`images` and as many padding images after them as round the forward's rows up to the
    next bucket. `family.forward(padded(...))[: len(images)]` is the images' noise."""
    rows = len(family.rows(images))
    buckets = row_buckets(images_per_step, family.rows_per_image)
    target = next((b for b in buckets if b >= rows), rows)
    return images + [_padding_row(images[0])] * (target - rows)


def _padding_row(image: ImageState) -> ImageState:
    """A copy of `image` that adds one row to a forward: its conditional one (without its
    negative prompt, it has no unconditional row). Shares its tensors; advances nothing."""
    prompt = replace(image.prompt, negative_embeds=None, negative_pooled=None, negative_mask=None)
    return replace(image, prompt=prompt, caches={})  # a cache state of its own


def warm_up(
    family: FlowFamily, width: int, height: int, images_per_step: int, guidance: float
) -> list[int]:
    """One forward at each bucket's row count for images of this size (rows of one image
    without guidance, so that every count from 1 can be made), smallest first; the counts
    run. A count that runs out of memory ends the warm-up of this size with a warning, not
    the replica's start: under traffic the loop splits such a step in halves (`Lane`), which
    run at the counts warmed."""
    warmed: list[int] = []
    with torch.no_grad():
        prompt = family.encode(["warm-up"], [None], [False])[0]
        image = family.start(prompt, width, height, _WARMUP_STEPS, guidance, seed=0)
        for rows in row_buckets(images_per_step, family.rows_per_image):
            try:
                family.forward([image] + [_padding_row(image)] * (rows - 1))
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                logger.warning(
                    "the loop's warm-up at %dx%d ran out of memory at %d rows: steps of more "
                    "rows will run in parts",
                    width,
                    height,
                    rows,
                )
                break
            warmed.append(rows)
    return warmed
