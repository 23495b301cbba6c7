"""The one builder of the `GenerationJob`s that tests hand a batch queue, an engine, a
generator client or a replica: `make_job`, with each test's own values over its defaults.

A test module keeps a short builder of its own where its jobs share values that differ from
these (its steps, its size, a prompt by seed); that builder says only what differs.
"""

from __future__ import annotations

from typing import Any

from deployments.jobs import GenerationJob

# A text-to-image job as cheap as the embedded models make one: 64x64, 2 denoising steps.
DEFAULTS: dict[str, Any] = {
    "prompt": "a lighthouse at dusk",
    "negative_prompt": None,
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "guidance_scale": 7.0,
}


def make_job(seed: int = 0, *, n: int = 1, **fields: Any) -> GenerationJob:
    """A job of `n` images, seeded `seed`, `seed + 1`, ... (unless `seeds` is given), with
    DEFAULTS for the fields not given. Any field of `GenerationJob` may be given
    (`request_id`, `partial_images`, an edit's `image`, `mask` and `strength`, `adapters`);
    those not in DEFAULTS keep the dataclass's own defaults."""
    return GenerationJob(**{**DEFAULTS, "seeds": tuple(range(seed, seed + n)), **fields})
