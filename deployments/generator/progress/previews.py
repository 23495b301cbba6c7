"""Cheap previews of images still being denoised, from their intermediate latents.

Decoding latents with the VAE at every preview would cost as much as decoding the final image
again. Instead, like the "approximate" previews of ComfyUI and AUTOMATIC1111, a preview is a
linear map from each latent pixel's channels to RGB: a few microseconds of matrix product,
at the latents' resolution (1/8 of the image's side for SD3 and SDXL), which the ingress
scales up. The map is not a table of constants for one model family: it is fitted when the
replica starts, by least squares against the model's own VAE (encode smooth random colour
images, regress their colours on the latents), so it suits whatever VAE the model has.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from deployments.jobs import (
    EventSink,
    GenerationJob,
    PartialImage,
    StepProgress,
    preview_steps,
)

if TYPE_CHECKING:
    from deployments.generator.calls.call_plan import CallPart

logger = logging.getLogger("ray.serve")

# Streamed progress is sent at most this often per job (and always after the last step): a
# page needs a few updates a second, not one per step of a fast model.
PROGRESS_INTERVAL_S = 0.1

_FIT_IMAGES = 24
_FIT_LATENT_SIDE = 8


class LatentPreviewer:
    """Maps the pipeline's (scaled) latents of shape (B, C, h, w), or a video-style VAE's
    (B, C, 1, h, w), to RGB uint8 (h, w, 3)."""

    def __init__(
        self,
        weights: torch.Tensor,
        bias: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
    ) -> None:
        self._weights = weights  # (C, 3)
        self._bias = bias  # (3,)
        # Per channel: the VAE's latent = the pipeline's latent x scale + shift.
        self._scale = scale.reshape(1, -1, 1, 1)
        self._shift = shift.reshape(1, -1, 1, 1)

    @classmethod
    def fit(cls, vae: torch.nn.Module, downsampling: int) -> LatentPreviewer:
        """Fit the map to `vae`, whose latents are `downsampling` times smaller per side."""
        side = _FIT_LATENT_SIDE * downsampling
        generator = torch.Generator("cpu").manual_seed(0)
        # Smooth images: random colours on a coarse grid, interpolated up; in [-1, 1].
        coarse = torch.rand(_FIT_IMAGES, 3, 4, 4, generator=generator) * 2 - 1
        images = torch.nn.functional.interpolate(
            coarse, size=(side, side), mode="bilinear", align_corners=False
        )
        latents = _encoded(vae, images)  # (N, C, 8, 8), unscaled
        targets = torch.nn.functional.adaptive_avg_pool2d(images, latents.shape[-2:])
        channels = latents.shape[1]
        inputs = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        inputs = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)
        outputs = targets.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(inputs, outputs).solution  # (C + 1, 3)
        scale, shift = _unscaling(vae.config, channels)
        return cls(weights=solution[:channels], bias=solution[channels], scale=scale, shift=shift)

    def to_rgb(self, latents: torch.Tensor) -> list[np.ndarray]:
        """One preview per latent in the batch."""
        if latents.ndim == 5:  # a video-style VAE's: its one frame
            latents = latents[:, :, 0]
        unscaled = latents.detach().float().cpu() * self._scale + self._shift
        rgb = torch.einsum("bchw,cd->bhwd", unscaled, self._weights) + self._bias
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        return list(pixels)


def _encoded(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`images` (N, 3, H, W) through the VAE's encoder: its latents' mean, (N, C, h, w).
    Image VAEs take 4-D input; video-style ones (Qwen-Image's, Wan's) take frames, 5-D. A
    KL VAE answers a distribution, a deterministic one (Sana's DC-AE) the latents."""
    parameter = next(vae.parameters())
    images = images.to(parameter.device, parameter.dtype)
    with torch.no_grad():
        try:
            encoded = vae.encode(images)
        except (ValueError, RuntimeError):
            encoded = vae.encode(images.unsqueeze(2))  # one frame
    distribution = getattr(encoded, "latent_dist", None)
    if distribution is not None:
        latents = distribution.mean
    else:
        latents = getattr(encoded, "latent", None)
        if latents is None:
            latents = encoded[0]
    if latents.ndim == 5:
        latents = latents[:, :, 0]
    return latents.float().cpu()


def _unscaling(config: Any, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, how the pipeline's latents become the VAE's: per-channel statistics
    (`latents_mean`, `latents_std`: Qwen-Image, Wan) or one `scaling_factor` and
    `shift_factor` (SD3, FLUX, SDXL, Sana)."""
    factor = float(getattr(config, "scaling_factor", None) or 1.0)
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None and len(mean) == len(std) == channels:
        # As their pipelines decode: latents x std / scaling_factor + mean.
        std_t = torch.tensor(std, dtype=torch.float32)
        return std_t / factor, torch.tensor(mean, dtype=torch.float32)
    shift = float(getattr(config, "shift_factor", None) or 0.0)
    return torch.full((channels,), 1.0 / factor), torch.full((channels,), shift)


def fit_previewer(pipeline) -> LatentPreviewer | None:
    """The pipeline's previewer, or None (and no previews) if its VAE cannot be fitted."""
    vae = getattr(pipeline, "vae", None)
    downsampling = getattr(pipeline, "vae_scale_factor", None)
    if vae is None or not hasattr(vae, "encode") or not downsampling:
        logger.warning("no previews: the pipeline has no VAE with an encoder")
        return None
    try:
        return LatentPreviewer.fit(vae, int(downsampling))
    except Exception:
        logger.warning("no previews: fitting them to the VAE failed", exc_info=True)
        return None


class StepReporter:
    """Sends each streamed job of a call its progress and, at its preview steps, previews.

    Runs in the worker thread, inside the pipeline's step callback. `spatial` turns the
    pipeline's latents into (B, C, h, w), whatever the family's layout. A job that runs in
    several calls (a large job in chunks, or a job run again after its batch failed) is told
    each call's steps: its progress starts over with each call, and previews of an image may
    come again. Rare enough, and simpler than progress across calls.
    """

    def __init__(
        self,
        parts: list[CallPart],
        previewer,
        spatial: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self._streamed: list[tuple[CallPart, EventSink, int]] = []
        offset = 0  # the part's first image in the call
        for part in parts:
            if part.queued.sink is not None:
                self._streamed.append((part, part.queued.sink, offset))
            offset += part.job.num_images
        self._previewer = previewer
        self._spatial = spatial
        self._last_progress = 0.0

    def step_done(self, step: int, total: int, latents: torch.Tensor) -> None:
        if not self._streamed:
            return
        now = time.monotonic()
        send_progress = step == total or now - self._last_progress >= PROGRESS_INTERVAL_S
        if send_progress:
            self._last_progress = now
        for part, sink, offset in self._streamed:
            job = part.job
            steps = preview_steps(job.partial_images, total) if self._previewer else ()
            if step in steps:
                own = latents[offset : offset + job.num_images]
                previews = _previews(self._previewer, self._spatial, own, job.request_id)
                if previews is None:
                    self._previewer = None  # none more in this call; its images go on
                for image_index, pixels in enumerate(previews or (), part.first):
                    sink(PartialImage(image_index, steps.index(step), pixels))
            if send_progress:
                sink(StepProgress(step=step, total_steps=total))


def _previews(
    previewer: LatentPreviewer,
    spatial: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    request_id: str,
) -> list[np.ndarray] | None:
    """Previews of `latents`, or None if they cannot be made (a family whose latents this
    service cannot lay out, say): a preview is a courtesy, and its failure must never fail
    the images being denoised."""
    try:
        return previewer.to_rgb(spatial(latents))
    except Exception:
        logger.warning("request %s: no more previews: making one failed", request_id, exc_info=True)
        return None


def spatial_latents(
    pipeline: DiffusionPipeline, width: int, height: int, latents: torch.Tensor
) -> torch.Tensor:
    """Latents as (B, C, h, w). FLUX-style pipelines denoise 2x2 patches packed into a
    sequence, (B, h/2 * w/2, 4C), and say how to unpack them; FLUX.2's place each token by
    its position ids and normalise the patches by the VAE's batch-norm statistics, which
    `_flux2_spatial` undoes as their pipelines do before decoding."""
    if latents.ndim == 3 and hasattr(pipeline, "_unpack_latents"):
        latents = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
    elif latents.ndim == 3 and hasattr(pipeline, "_unpack_latents_with_ids"):
        latents = _flux2_spatial(pipeline, width, height, latents)
    if latents.ndim == 5:  # a video-style VAE's (B, C, 1, h, w): Qwen-Image's
        latents = latents[:, :, 0]
    if latents.ndim != 4:
        raise ValueError(f"no (B, C, h, w) view of latents shaped {tuple(latents.shape)}")
    return latents


def _flux2_spatial(
    pipeline: DiffusionPipeline, width: int, height: int, latents: torch.Tensor
) -> torch.Tensor:
    """FLUX.2's packed latents (B, rows x cols, 4C) as the VAE's (B, C, 2 rows, 2 cols): the
    tokens scattered to the grid their position ids give (`_prepare_latent_ids`, row by
    row), the batch-norm normalisation undone, the 2x2 patches unfolded."""
    cell = pipeline.vae_scale_factor * 2  # a token holds 2x2 latent pixels
    rows, cols = height // cell, width // cell
    # The ids depend on the grid's shape alone: a tensor of that shape with no storage.
    grid = torch.empty(latents.shape[0], latents.shape[2], rows, cols, device="meta")
    ids = pipeline._prepare_latent_ids(grid).to(latents.device)
    patches = pipeline._unpack_latents_with_ids(latents, ids)
    norm = pipeline.vae.bn
    std = torch.sqrt(norm.running_var + pipeline.vae.config.batch_norm_eps)
    std = std.view(1, -1, 1, 1).to(patches.device, patches.dtype)
    mean = norm.running_mean.view(1, -1, 1, 1).to(patches.device, patches.dtype)
    return pipeline._unpatchify_latents(patches * std + mean)


class JobReporter:
    """Sends one streamed job of the continuous loop its progress and previews.

    In the loop a job's images step together (they join together and run the same steps),
    so its progress is its own, whatever else shares the step; runs in the lane's thread.
    `spatial(latents, width, height)` is the family's (B, C, h, w) view of its latents.
    """

    def __init__(
        self,
        sink: EventSink | None,
        job: GenerationJob,
        spatial: Callable[[torch.Tensor, int, int], torch.Tensor],
        previewer: LatentPreviewer | None,
    ) -> None:
        self._sink = sink
        self._job = job
        self._spatial = spatial
        self._total = job.num_inference_steps
        self._previews = preview_steps(job.partial_images, self._total) if previewer else ()
        self._previewer = previewer
        self._last_progress = 0.0

    def step_done(self, images: Sequence[Any]) -> None:
        """After a step of the job's `images` (`families.ImageState`s)."""
        if self._sink is None:
            return
        step = images[0].step
        if step in self._previews:
            latents = torch.cat([image.latents for image in images])
            job = self._job
            spatial = functools.partial(self._spatial, width=job.width, height=job.height)
            previews = _previews(self._previewer, spatial, latents, job.request_id)
            if previews is None:
                self._previews = ()  # none more for this job; its images go on
            for image_index, pixels in enumerate(previews or ()):
                self._sink(PartialImage(image_index, self._previews.index(step), pixels))
        now = time.monotonic()
        if step == self._total or now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self._sink(StepProgress(step=step, total_steps=self._total))
