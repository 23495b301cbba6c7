"""The limits a loaded model sets on requests, asked of the model itself (design note 11).

What passes the ingress's validation must generate, so the ingress needs the model's own
limits, not guesses:
- sizes: a transformer with a fixed table of positional embeddings (SD3's
  `pos_embed_max_size`) fails past it (`Width (65) cannot be greater than
  pos_embed_max_size: 64` at 1040 pixels for tiny-sd3); and width and height must be
  multiples of the latent grid's cell (the VAE's downsampling times the patch size, or
  FLUX's 2x2 latent packing), below which a pipeline fails or silently makes another size;
- edits: a pipeline runs about `num_inference_steps x strength` steps and fails when that
  comes to 0; SDXL's rounds down (`int(steps x strength)`), SD3's and FLUX's round up.
  Rather than a table of families, the rule is read off the edit pipeline's own
  `get_timesteps`, called on probes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from deployments.config.model_config import ModelConfig
from deployments.jobs import ModelCapabilities, edit_steps_run
from deployments.sizes import parse_size

logger = logging.getLogger("ray.serve")

# (num_inference_steps, strength) pairs on which the rounding rules differ (0.25 x 3) and
# agree (0.5 x 4), products below 1 among them.
_PROBES = [
    (steps, strength)
    for steps in range(1, 13)
    for strength in (0.01, 0.05, 0.1, 0.25, 0.3, 0.33, 0.5, 0.7, 0.75, 0.8, 0.99, 1.0)
]


@dataclass(frozen=True)
class SizeLimits:
    """See `ModelCapabilities` for what each field means."""

    max_width: int | None
    max_height: int | None
    size_multiple: int


def size_limits(pipeline: Any) -> SizeLimits:
    """The size limits of `pipeline`'s denoiser and latent grid."""
    denoiser = getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None)
    config = getattr(denoiser, "config", None)
    patch = int(getattr(config, "patch_size", None) or 1)
    # The VAE's downsampling, and the pixels per latent cell that the pipeline's image
    # processor rounds sizes to (FLUX's is twice the VAE's: it packs latents 2x2).
    latent_scale = int(getattr(pipeline, "vae_scale_factor", None) or 1)
    processor_config = getattr(getattr(pipeline, "image_processor", None), "config", None)
    cell = int(getattr(processor_config, "vae_scale_factor", None) or latent_scale)
    # PatchEmbed crops a table of `pos_embed_max_size` x `pos_embed_max_size` patches.
    max_patches = getattr(config, "pos_embed_max_size", None)
    max_side = int(max_patches) * patch * latent_scale if max_patches else None
    max_width = max_height = max_side
    # Rotary tables of (text or frames, height, width) positions, one a patch, each as long as
    # `axes_lens` says (Z-Image's): one position more fails with an IndexError.
    lengths = getattr(config, "axes_lens", None)
    if lengths is not None and len(lengths) == 3:
        max_height, max_width = int(lengths[1]) * cell, int(lengths[2]) * cell
    # A pipeline that packs its latents into patches itself (FLUX, Chroma, Qwen-Image) rounds
    # sizes to a cell that already holds the packing: Qwen-Image's transformer says
    # `patch_size` 2 for the same 2x2 packing, which must not count twice.
    multiple = cell if hasattr(pipeline, "_pack_latents") else cell * patch
    return SizeLimits(max_width=max_width, max_height=max_height, size_multiple=multiple)


def edit_step_rounding(pipeline_class: type) -> str | None:
    """How the edit pipeline `pipeline_class` rounds `steps x strength` to the steps it runs:
    "floor" or "ceil" (as `deployments.jobs.edit_steps_run` computes them), or None if its
    `get_timesteps` cannot be probed or follows neither rule."""
    get_timesteps = getattr(pipeline_class, "get_timesteps", None)
    if get_timesteps is None:
        return None
    observed = {}
    for steps, strength in _PROBES:
        # `get_timesteps` slices the scheduler's timesteps and counts what is left; a
        # stand-in scheduler is enough, and needs no `set_timesteps` arguments (FLUX's `mu`).
        probe = SimpleNamespace(scheduler=SimpleNamespace(timesteps=torch.zeros(steps), order=1))
        try:
            _, ran = get_timesteps(probe, steps, strength, torch.device("cpu"))
        except Exception:
            logger.warning("cannot probe %s.get_timesteps", pipeline_class.__name__, exc_info=True)
            return None
        observed[steps, strength] = int(ran)
    for rule in ("floor", "ceil"):
        if all(
            edit_steps_run(rule, steps, strength) == ran
            for (steps, strength), ran in observed.items()
        ):
            return rule
    logger.warning("%s rounds edit steps in an unknown way", pipeline_class.__name__)
    return None


def check_default_size(model: ModelConfig, capabilities: ModelCapabilities) -> None:
    """Refuse to start if the model's configured `default_size` is one the loaded model
    cannot make: every request with `size: auto` would fail, so the deployment must."""
    multiple = math.lcm(model.size_multiple, capabilities.size_multiple)
    try:
        parse_size(
            model.default_size,
            default=model.default_size,
            multiple=multiple,
            max_pixels=2**62,  # the service's own limit is the config's, checked there
            max_width=capabilities.max_width,
            max_height=capabilities.max_height,
        )
    except ValueError as error:
        raise ValueError(
            f"model {model.id!r}: default_size {model.default_size} does not fit the loaded "
            f"{capabilities.pipeline_class} ({error}); set models[].default_size and "
            "models[].size_multiple to what it takes"
        ) from None
