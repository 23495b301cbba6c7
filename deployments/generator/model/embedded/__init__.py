"""The embedded models: tiny diffusers pipelines built from configs, with no download.

No machine that builds or tests this project can reach a model hub, so the service ships
recipes for miniature pipelines of eight families instead, each the real architecture at toy
sizes with random weights from a fixed seed:
- `tiny-sd3`: `StableDiffusion3Pipeline` (MMDiT transformer, two CLIP encoders and T5);
- `tiny-sdxl`: `StableDiffusionXLPipeline` (UNet, two CLIP encoders);
- `tiny-flux`: `FluxPipeline` (flow-matching transformer with packed latents, CLIP and T5);
- `tiny-chroma`: `ChromaPipeline` (FLUX's layout without CLIP or guidance embedding: T5
  alone, real classifier-free guidance with a negative prompt);
- `tiny-qwen-image`: `QwenImagePipeline` (a Qwen2.5-VL text encoder with a byte-level BPE
  tokenizer, a video-style 5-D VAE normalised per channel, "true" CFG);
- `tiny-z-image`: `ZImagePipeline` (a single-stream transformer on a Qwen3 encoder's
  chat-templated prompt, classifier-free guidance);
- `tiny-flux2-klein`: `Flux2KleinPipeline` (FLUX.2's transformer on latents packed with
  position ids, a VAE normalised by batch-norm statistics, three layers of a Qwen3 causal
  LM as the prompt; classifier-free guidance against an empty prompt);
- `tiny-wan` and `tiny-wan-i2v`: Wan 2.1's `WanPipeline` and `WanImageToVideoPipeline`, video
  models (a causal 3-D VAE, 4x in time and 8x in space, a transformer over its latents, UMT5
  for the prompt, classifier-free guidance; the image-to-video one also a CLIP vision
  encoder of the first frame). They make frames, not images: the video workers serve them.
Each is saved with `save_pretrained` and loaded back through the same `from_pretrained` path
as a real checkpoint, so every code path the service runs on a GPU is exercised on a laptop
CPU. Their images are noise.

This module is the registry; the tokenizers, the shared parts and each family's builder are
the modules beside it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from deployments.config.base import default_cache_dir
from deployments.generator.model.embedded.tiny_flux import (
    build_tiny_chroma_pipeline,
    build_tiny_flux_pipeline,
)
from deployments.generator.model.embedded.tiny_flux2_klein import build_tiny_flux2_klein_pipeline
from deployments.generator.model.embedded.tiny_qwen_image import build_tiny_qwen_image_pipeline
from deployments.generator.model.embedded.tiny_stable_diffusion import (
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
)
from deployments.generator.model.embedded.tiny_wan import (
    build_tiny_wan_i2v_pipeline,
    build_tiny_wan_pipeline,
)
from deployments.generator.model.embedded.tiny_z_image import build_tiny_z_image_pipeline

EMBEDDED_SCHEME = "embedded:"
_BUILDERS = {
    "tiny-sd3": build_tiny_sd3_pipeline,
    "tiny-sdxl": build_tiny_sdxl_pipeline,
    "tiny-flux": build_tiny_flux_pipeline,
    "tiny-chroma": build_tiny_chroma_pipeline,
    "tiny-qwen-image": build_tiny_qwen_image_pipeline,
    "tiny-z-image": build_tiny_z_image_pipeline,
    "tiny-flux2-klein": build_tiny_flux2_klein_pipeline,
    "tiny-wan": build_tiny_wan_pipeline,
    "tiny-wan-i2v": build_tiny_wan_i2v_pipeline,
}
EMBEDDED_MODELS = tuple(_BUILDERS)
# Bump when a recipe changes, so caches built by an older version are not reused.
RECIPE_VERSION = 2


def is_embedded(source: str) -> bool:
    """Whether a model `source` names an embedded model (`embedded:<name>`)."""
    return source.startswith(EMBEDDED_SCHEME)


def ensure_embedded_model(source: str, cache_dir: Path | None = None) -> Path:
    """Return the directory of the embedded model `source`, building and saving it if needed."""
    name = source.removeprefix(EMBEDDED_SCHEME)
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"unknown embedded model {source!r}; available: "
            + ", ".join(EMBEDDED_SCHEME + known for known in EMBEDDED_MODELS)
        )

    def save(directory: Path) -> None:
        build_embedded_pipeline(name).save_pretrained(directory)

    return build_once(f"{name}-v{RECIPE_VERSION}", save, "model_index.json", cache_dir)


def build_once(
    name: str, save: Callable[[Path], None], marker: str, cache_dir: Path | None = None
) -> Path:
    """The directory `name` in the cache (`cache_dir`, else the default), which
    `save(directory)` writes the first time; a directory holding its file `marker` is built.

    `save` writes into a temporary directory, renamed into place when done, so processes
    that start at the same time never load a half-written model.
    """
    root = cache_dir or default_cache_dir()
    target = root / name
    if (target / marker).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        save(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is identical (same seed, same recipe).
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_embedded_pipeline(name: str):
    """Build embedded model `name` in memory, deterministically (same weights every time)."""
    return _BUILDERS[name]()
