"""`embedded:tiny-safety-checker`: an image classifier at toy size with random weights, built
offline from a fixed seed like the embedded models, so every path of output checking runs
on any machine. Its labels are `normal` and `nsfw`; what it scores is noise, so a test makes
it block or pass by the thresholds it configures (0 blocks every image, 1 none that scores
below 1)."""

from __future__ import annotations

from pathlib import Path

from deployments.generator.model.embedded import EMBEDDED_SCHEME, build_once

TINY_CHECKER = "tiny-safety-checker"
_SEED = 0
_SIDE = 32  # the classifier's input: every image is scaled to 32x32


def is_tiny_checker(source: str) -> bool:
    return source == EMBEDDED_SCHEME + TINY_CHECKER


def ensure_tiny_checker(cache_dir: Path | None = None) -> Path:
    """The directory of the tiny checker (model and image processor), built if needed."""
    return build_once(f"{TINY_CHECKER}-v1", _save_tiny_checker, "config.json", cache_dir)


def _save_tiny_checker(directory: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(_SEED)
    config = ViTConfig(
        image_size=_SIDE,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=2,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    ViTForImageClassification(config).save_pretrained(directory)
    processor = ViTImageProcessor(size={"height": _SIDE, "width": _SIDE})
    processor.save_pretrained(directory)
