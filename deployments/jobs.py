"""What the ingress sends a generator replica, and what comes back.

Plain data with no torch in it: the ingress (a CPU process without the model) builds a
`GenerationJob` from a validated request, and the generator answers with raw pixels, which
the ingress encodes. Encoding stays off the replica so it spends its time on the model.
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

    @property
    def num_images(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class GeneratedImages:
    """The images of one job, in seed order, as RGB uint8 arrays of shape (H, W, 3)."""

    images: list[np.ndarray]
    seeds: tuple[int, ...]
    # How the job ran: seconds of its pipeline call, and images in that call (its batch).
    generate_s: float = 0.0
    batch_images: int = 0
