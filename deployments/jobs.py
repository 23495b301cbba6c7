"""What the ingress sends a generator replica, and what comes back.

Plain data with no torch in it: the ingress (a CPU process without the model) builds a
`GenerationJob` from a validated request, and the generator answers with raw pixels, which
the ingress encodes. Encoding stays off the replica so it spends its time on the model.

A streamed job also gets events while it runs: `StepProgress` after denoising steps and
`PartialImage` previews (small, at the latents' resolution), then its `GeneratedImages`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GenerationJob:
    """One request's images: all share the prompt and parameters, each has its own seed."""

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

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    def preview_steps(self) -> tuple[int, ...]:
        """After which steps (1-based) a preview is made: spread evenly, never the last."""
        steps = self.num_inference_steps
        wanted = {
            round(steps * (i + 1) / (self.partial_images + 1)) for i in range(self.partial_images)
        }
        return tuple(sorted(step for step in wanted if 1 <= step < steps))


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


GenerationEvent = StepProgress | PartialImage | GeneratedImages
