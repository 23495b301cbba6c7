"""What the ingress sends a generator replica, and what comes back.

Plain data with no torch in it: the ingress (a CPU process without the model) builds a
`GenerationJob` from a validated request, and the generator answers with raw pixels, which
the ingress encodes. Encoding stays off the replica so it spends its time on the model.

A streamed job also gets events while it runs: `StepProgress` after denoising steps and
`PartialImage` previews (small, at the latents' resolution), then its `GeneratedImages`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from deployments.scheduling.job_schedule import UNSCHEDULED, JobSchedule
from deployments.sizes import format_size

# What a pipeline call does: draw from a prompt, redraw a whole image (image-to-image), or
# redraw the masked part of one (inpainting).
Task = Literal["text-to-image", "image-to-image", "inpaint"]


# A LoRA adapter applied in a pipeline call, and its scale: (adapter id, scale).
AdapterWeight = tuple[str, float]


def adapter_set_id(adapters: tuple[AdapterWeight, ...]) -> str:
    """The ids of a job's adapters joined by `+` (sorted): what its replica must have
    loaded, and the multiplexed model id its request is routed by. "" for none."""
    return "+".join(sorted(adapter_id for adapter_id, _ in adapters))


@dataclass(frozen=True)
class GenerationJob:
    """One request's images: all share the prompt and parameters, each has its own seed.

    An edit carries its input: either `image` (and `mask`), already at the output size,
    which each of its images starts from (image-to-image, inpainting); or `references`,
    the images a reference-conditioned model (FLUX.2, Qwen-Image-Edit-Plus) conditions
    every one of its images on, each at its own size (`ModelCapabilities.reference_images`).
    """

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    request_id: str = ""
    # Previews of each image while it is denoised (0-3); streamed jobs only.
    partial_images: int = 0
    # Edits: RGB uint8 (height, width, 3); the mask is uint8 (height, width), 255 = redraw.
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float | None = None
    # Reference-conditioned edits: RGB uint8 (h, w, 3) each, in upload order.
    references: tuple[np.ndarray, ...] = field(default=(), compare=False, repr=False)
    # LoRA adapters and their scales, sorted by id; none with scale 0 (that is the base).
    adapters: tuple[AdapterWeight, ...] = ()
    # OpenAI's `moderation`: "auto", or "low" (the model's relaxed safety thresholds).
    moderation: Literal["auto", "low"] = "auto"
    # Its class and deadline: where it stands in its replica's queue (`scheduling/`).
    schedule: JobSchedule = field(default=UNSCHEDULED, compare=False)

    @property
    def size(self) -> str:
        """`WIDTHxHEIGHT`, as the API writes sizes."""
        return format_size(self.width, self.height)

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def task(self) -> Task:
        if self.references:
            return "image-to-image"
        if self.image is None:
            return "text-to-image"
        return "image-to-image" if self.mask is None else "inpaint"


# The most input images one edit takes (OpenAI's limit for `image[]`).
MAX_INPUT_IMAGES = 16


def preview_steps(partial_images: int, total_steps: int) -> tuple[int, ...]:
    """After which steps (1-based) a preview is made: spread evenly, never the last."""
    wanted = {round(total_steps * (i + 1) / (partial_images + 1)) for i in range(partial_images)}
    return tuple(sorted(step for step in wanted if 1 <= step < total_steps))


# The optional request parameters that a pipeline may or may not take, by the name of the
# pipeline call's argument that each one becomes.
OPTIONAL_PARAMETERS = {
    "negative_prompt": "negative_prompt",
    "guidance_scale": "guidance_scale",
    "strength": "strength",
    # OpenAI's `input_fidelity` sets the strength: taken where `strength` is.
    "input_fidelity": "strength",
    "mask": "mask_image",
}


def edit_steps_run(rounding: str, steps: int, strength: float) -> int:
    """The denoising steps an edit of `steps` at `strength` runs: diffusers' own arithmetic
    (`get_timesteps`), float for float. "floor" (SDXL): int(steps x strength), 0 when
    steps x strength < 1; "ceil" (SD3, FLUX): steps x strength rounded up, at least 1
    whenever strength > 0. The one rule for every count of an edit's steps (validation,
    usage, the autoscaler's work)."""
    wanted = min(steps * strength, steps)
    if rounding == "floor":
        return int(wanted)
    return steps - int(max(steps - wanted, 0))


@dataclass(frozen=True)
class ModelCapabilities:
    """What a model's loaded pipeline can do: for each task it can run, the optional request
    parameters (keys of `OPTIONAL_PARAMETERS`) its pipeline takes. The ingress checks
    requests against it, so a parameter the model would ignore is a 400 that names it.

    And the limits the model itself sets (read off the loaded model at start-up), so that a
    request that passes validation generates, for every task:
    - `max_width`, `max_height`: the largest width and height in pixels (None: no cap);
    - `size_multiple`: width and height must be multiples of it, so it is the smallest side;
    - `edit_step_rounding`: for each edit task that takes `strength`, how its pipeline makes
      `num_inference_steps x strength` a number of steps, "floor" or "ceil" (see
      `edit_steps_run`); an edit fails when that number is 0."""

    pipeline_class: str
    tasks: dict[str, frozenset[str]]
    max_width: int | None = None
    max_height: int | None = None
    size_multiple: int = 1
    edit_step_rounding: dict[str, str] = field(default_factory=dict)
    # Whether the model's VAE could be fitted for previews: without, `partial_images` > 0
    # is refused rather than silently sending none.
    previews: bool = True
    # What `guidance_scale` does (`pipelines.guidance_of`): "classifier-free", "true-cfg",
    # "distilled" or "none".
    guidance: str = "classifier-free"
    # How many images an image-to-image edit takes as references, for a model conditioned
    # on input images (its edit class takes `image` and no `strength`): 1, or up to
    # `MAX_INPUT_IMAGES` where a probe at start showed it uses a second one. 0: its edits
    # start from their one input image (`strength`), as SD3's and SDXL's do.
    reference_images: int = 0
    # What each reference must be, from the pipeline's own check of its inputs (FLUX.2's
    # image processor: sides of at least 64 pixels, at most 8:1).
    reference_min_side: int = 1
    reference_max_aspect: float | None = None

    def edit_steps(self, task: str, steps: int, strength: float) -> int:
        """The denoising steps an edit of `task` runs; 0 means its pipeline would fail. A
        task without a known rule counts as "floor", the stricter one."""
        return edit_steps_run(self.edit_step_rounding.get(task, "floor"), steps, strength)


@dataclass(frozen=True)
class StepProgress:
    """A streamed job has finished `step` of its `total_steps` denoising steps."""

    step: int
    total_steps: int


@dataclass(frozen=True)
class PartialImage:
    """A preview of image `image_index` of a job: RGB uint8 at the latents' resolution."""

    image_index: int
    partial_image_index: int
    pixels: np.ndarray


@dataclass(frozen=True)
class GeneratedImages:
    """The images of one job, in seed order, as RGB uint8 arrays of shape (H, W, 3)."""

    images: list[np.ndarray]
    seeds: tuple[int, ...]
    # How the job ran: seconds of its pipeline call, and images in that call (its batch).
    generate_s: float = 0.0
    batch_images: int = 0
    # Where its time went on the replica: waiting for its batch to start, encoding the
    # prompts, the denoising loop, and decoding latents to pixels (VAE and post-processing).
    queue_s: float = 0.0
    text_encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    # Tokens of the prompt and negative prompt by the model's tokenizer, for the usage.
    text_tokens: int = 0


GenerationEvent = StepProgress | PartialImage | GeneratedImages

# Where a streamed job's progress and previews go, on the generator side; called from a
# worker thread.
EventSink = Callable[[GenerationEvent], None]
# A job's finished result as it leaves the generator replica (the safety gate's): the same
# result, or the exception the job fails with instead.
Screen = Callable[[GenerationJob, "GeneratedImages | Exception"], "GeneratedImages | Exception"]


class GenerationOutOfMemory(Exception):
    """A job's image ran out of device memory even alone in its pipeline call.

    The replica stays healthy (the failed call's memory is freed), and the same request may
    fit later, when fewer calls share the device: a retryable answer (503), not the client's
    fault. Plain data (a message), so it crosses Ray pickled to the ingress.
    """


class DeadlineUnreachable(Exception):
    """The replica cannot finish the job by its deadline at the rate it runs now, so it
    refused it before any compute: a retryable 503 with `retry-after` (by then, the work
    ahead of it is less). Plain data, so it crosses Ray pickled to the ingress."""

    def __init__(self, late_s: float, retry_after_s: int) -> None:
        super().__init__(late_s, retry_after_s)
        self.late_s = late_s
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"would finish {self.late_s:.1f} s after its deadline"


class AdapterUnavailable(Exception):
    """A configured adapter could not be loaded into the model (its source is missing, or
    its weights do not fit the model's modules). Nothing of it stays loaded and the replica
    stays healthy; its requests get a 400 naming the adapter. Plain data, so it crosses Ray
    pickled to the ingress."""

    def __init__(self, adapter_id: str, reason: str) -> None:
        super().__init__(adapter_id, reason)
        self.adapter_id = adapter_id
        self.reason = reason

    def __str__(self) -> str:
        return f"adapter {self.adapter_id!r} could not be loaded: {self.reason}"


class ImagesBlocked(Exception):
    """The model's safety checker blocked `blocked` of the request's `total` images (in the
    categories named), so none of its images leaves the replica: a 400
    `moderation_blocked`, not retried (the same request makes the same images). Plain data,
    without the images or the prompt, so it crosses Ray pickled to the ingress."""

    def __init__(self, blocked: int, total: int, categories: tuple[str, ...]) -> None:
        super().__init__(blocked, total, categories)
        self.blocked = blocked
        self.total = total
        self.categories = categories

    def __str__(self) -> str:
        return f"{self.blocked} of {self.total} images blocked ({', '.join(self.categories)})"


class ReplicaBroken(RuntimeError):
    """The device failed in a way that later jobs would hit too (a CUDA error, say): the
    replica's health check fails so that Serve replaces it, and until then its jobs fail
    at once. Retryable (503): another replica, or this one's successor, can serve them."""
