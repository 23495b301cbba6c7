"""The arguments of one pipeline call for a batch of jobs: a pure function of the jobs.

Everything a batch's jobs share (size, steps, guidance, strength, whether a negative prompt is
given) is taken from its first job: `deployments/generator/calls/batching.py` only groups jobs on
which it is equal. Everything else is per image, in job order and, within a job, in seed
order: the pipeline returns its images in that order, and the call plan splits them back into
jobs the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch

from deployments.jobs import GenerationJob

# diffusers' `callback_on_step_end(pipeline, step, timestep, callback_kwargs) -> kwargs`.
StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


def pipeline_arguments(
    jobs: list[GenerationJob],
    takes: frozenset[str],
    on_step_end: StepCallback,
    true_cfg: bool = False,
) -> dict[str, Any]:
    """The keyword arguments of the pipeline call that runs `jobs` as one batch, limited to
    those in `takes` (the view's `call_parameters`). `true_cfg`: the model's guidance is the
    pipeline's `true_cfg_scale` with a negative prompt (`pipelines.guidance_of`)."""
    first = jobs[0]
    negative_prompts = None
    if first.negative_prompt is not None:  # the same for all jobs of a batch
        negative_prompts = _per_image(jobs, [job.negative_prompt for job in jobs])
    # One generator per image, on the CPU: each image's noise depends only on its own seed
    # (not on its batch neighbours), and a seed gives the same noise on any device.
    generators = [torch.Generator("cpu").manual_seed(s) for job in jobs for s in job.seeds]
    arguments: dict[str, Any] = {
        "prompt": _per_image(jobs, [job.prompt for job in jobs]),
        "negative_prompt": negative_prompts,
        "width": first.width,
        "height": first.height,
        "num_inference_steps": first.num_inference_steps,
        "guidance_scale": first.guidance_scale,
        "generator": generators,
        "output_type": "np",
        "callback_on_step_end": on_step_end,
    }
    if first.image is not None:  # an edit: each image of each job starts from its input
        arguments["image"] = _per_image(jobs, [_pil(job.image) for job in jobs])
        arguments["strength"] = first.strength
    if first.references:  # the batch is this one job (`batching.batch_key`)
        arguments["image"] = [_pil(reference) for reference in first.references]
    if first.mask is not None:
        arguments["mask_image"] = _per_image(jobs, [_pil(job.mask) for job in jobs])
    if true_cfg:
        # The request's guidance is the pipeline's "true" guidance, which runs only with a
        # negative prompt: none given is "" (what SD3 and Chroma make of none).
        arguments["true_cfg_scale"] = first.guidance_scale
        # Its `guidance_scale` would be for a guidance-distilled model: none is.
        del arguments["guidance_scale"]
        if negative_prompts is None and first.guidance_scale > 1:
            arguments["negative_prompt"] = _per_image(jobs, ["" for _ in jobs])
    # The ingress rejected what a client asked for that this pipeline does not take; what is
    # left out here are the service's own defaults (say, `width` for a pipeline that takes
    # its size from the input image), and what the request did not set: the pipeline's own
    # default stands (Sana's `negative_prompt` is "", and None fails its text cleaning).
    return {name: value for name, value in arguments.items() if name in takes and value is not None}


def _pil(pixels: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(pixels)


def _per_image(jobs: list[GenerationJob], per_job: list) -> list:
    """One entry per image of the batch: each job's own, repeated for each of its seeds."""
    return [value for job, value in zip(jobs, per_job, strict=True) for _ in job.seeds]
