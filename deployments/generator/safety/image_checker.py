"""The image classifier of `models[].safety`: loaded once per replica beside the pipeline,
scoring a request's images in one batch.

Two kinds of checker, told apart by the checkpoint's config:
- an image-classification model (transformers' `AutoModelForImageClassification` with its
  `AutoImageProcessor`; e.g. a ViT NSFW classifier): its scores are its labels'
  probabilities (softmax);
- diffusers' `StableDiffusionSafetyChecker` (CLIP with concept embeddings; its checkpoint's
  `feature_extractor` sits beside it, or in the same directory): category `nsfw`, 1 when it
  finds any of its concepts in the image, else 0 (its own per-concept thresholds decide).

Inference only, under `torch.no_grad`, no state kept between calls: concurrent requests may
score at once (each call runs on its own inputs).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from deployments.config.safety_config import SafetyConfig
from deployments.generator.safety.tiny_checker import ensure_tiny_checker, is_tiny_checker

logger = logging.getLogger("ray.serve")

SD_CHECKER_CLASS = "StableDiffusionSafetyChecker"


class ImageChecker:
    """`scores(images)`: for each image (uint8 RGB (h, w, 3)), its score per category."""

    def __init__(self, model: torch.nn.Module, processor, device: torch.device, kind: str):
        self._model = model.eval().to(device)
        self._processor = processor
        self._device = device
        self.kind = kind  # "image-classification" or "stable-diffusion"
        if kind == "stable-diffusion":
            self.categories: tuple[str, ...] = ("nsfw",)
        else:
            labels = model.config.id2label
            self.categories = tuple(labels[i] for i in sorted(labels))

    @torch.no_grad()
    def scores(self, images: list[np.ndarray]) -> list[dict[str, float]]:
        if not images:
            return []
        pictures = [PIL.Image.fromarray(image) for image in images]
        inputs = self._processor(images=pictures, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self._device, self._model.dtype)
        if self.kind == "stable-diffusion":
            # The checker blacks out what it flags in the arrays it is given: copies.
            copies = np.stack([image.astype(np.float32) / 255 for image in images])
            _, flagged = self._model(clip_input=pixel_values, images=copies)
            return [{"nsfw": float(bool(found))} for found in flagged]
        probabilities = self._model(pixel_values=pixel_values).logits.float().softmax(dim=-1)
        return [dict(zip(self.categories, row.tolist(), strict=True)) for row in probabilities]


def load_image_checker(config: SafetyConfig, device: torch.device) -> ImageChecker:
    """The configured checker on the replica's device, in float32 (it is small beside the
    pipeline, and its thresholds were set in float32). A checker that does not load fails
    the replica's start, naming the key."""
    source: str | Path = config.checker
    if is_tiny_checker(config.checker):
        source = ensure_tiny_checker()
    try:
        checker = _load(source, config.revision, device)
    except Exception as error:
        raise ValueError(
            f"models[].safety.checker: {config.checker!r} could not be loaded as an image "
            f"classifier or a StableDiffusionSafetyChecker ({type(error).__name__}: {error})"
        ) from error
    unknown = set(config.thresholds) | set(config.low_thresholds or {})
    unknown -= set(checker.categories)
    if unknown:
        raise ValueError(
            f"models[].safety.thresholds: the checker has no category {sorted(unknown)!r}; "
            f"its categories are {list(checker.categories)!r}"
        )
    logger.info("safety checker %s (%s) loaded", config.checker, ", ".join(checker.categories))
    return checker


def _load(source: str | Path, revision: str | None, device: torch.device) -> ImageChecker:
    from transformers import AutoImageProcessor, CLIPImageProcessor

    if not Path(source).is_dir():  # a hub id: its files, fetched once into the HF cache
        from huggingface_hub import snapshot_download

        source = snapshot_download(str(source), revision=revision)
    if _is_sd_checker(source):
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )

        model_dir, processor_dir = _sd_checker_parts(Path(source))
        model = StableDiffusionSafetyChecker.from_pretrained(model_dir, dtype=torch.float32)
        processor = CLIPImageProcessor.from_pretrained(processor_dir)
        return ImageChecker(model, processor, device, "stable-diffusion")
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(source, dtype=torch.float32)
    processor = AutoImageProcessor.from_pretrained(source)
    return ImageChecker(model, processor, device, "image-classification")


def _is_sd_checker(source: str | Path) -> bool:
    """Whether a checkpoint is diffusers' safety checker (by its config's class)."""
    path = Path(source)
    for config in (path / "config.json", path / "safety_checker" / "config.json"):
        if config.is_file():
            return SD_CHECKER_CLASS in json.loads(config.read_text()).get("architectures", [])
    return False


def _sd_checker_parts(path: Path) -> tuple[Path, Path]:
    """The checker's weights and its CLIP image processor: a pipeline's layout
    (`safety_checker/`, `feature_extractor/`) or one directory holding both."""
    if (path / "safety_checker").is_dir():
        return path / "safety_checker", path / "feature_extractor"
    return path, path
