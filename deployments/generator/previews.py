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

import logging

import numpy as np
import torch

logger = logging.getLogger("ray.serve")

_FIT_IMAGES = 24
_FIT_LATENT_SIDE = 8


class LatentPreviewer:
    """Maps the pipeline's (scaled) latents of shape (B, C, h, w) to RGB uint8 (h, w, 3)."""

    def __init__(
        self, weights: torch.Tensor, bias: torch.Tensor, scaling_factor: float, shift_factor: float
    ) -> None:
        self._weights = weights  # (C, 3)
        self._bias = bias  # (3,)
        self._scaling_factor = scaling_factor
        self._shift_factor = shift_factor

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
        parameter = next(vae.parameters())
        with torch.no_grad():
            latents = vae.encode(images.to(parameter.device, parameter.dtype)).latent_dist.mean
        latents = latents.float().cpu()  # (N, C, 8, 8), unscaled
        targets = torch.nn.functional.adaptive_avg_pool2d(images, latents.shape[-2:])
        channels = latents.shape[1]
        inputs = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        inputs = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)
        outputs = targets.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(inputs, outputs).solution  # (C + 1, 3)
        config = vae.config
        return cls(
            weights=solution[:channels],
            bias=solution[channels],
            scaling_factor=float(getattr(config, "scaling_factor", None) or 1.0),
            shift_factor=float(getattr(config, "shift_factor", None) or 0.0),
        )

    def to_rgb(self, latents: torch.Tensor) -> list[np.ndarray]:
        """One preview per latent in the batch."""
        unscaled = latents.detach().float().cpu() / self._scaling_factor + self._shift_factor
        rgb = torch.einsum("bchw,cd->bhwd", unscaled, self._weights) + self._bias
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        return list(pixels)


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
