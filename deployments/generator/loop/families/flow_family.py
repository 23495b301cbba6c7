"""What every flow-matching family gives the continuous loop: an image's state (its
latents, its own scheduler at its own step, its prompt's embeddings), and the `FlowFamily`
interface whose subclasses (`sd3.py`, `flux.py`, `z_image.py`) take their pipeline's
`__call__` apart into encode, start, one step over many images, and decode.

A diffusers pipeline call runs every image of its batch with one number of steps, one
guidance scale and one timestep per step. The continuous loop (`denoise_loop.py`) runs images
that joined at different steps with their own steps and guidance, so each image here keeps
what the pipeline keeps for its whole batch: its own scheduler (timesteps and sigmas for its
own `num_inference_steps`), its own guidance scale, its own prompt embeddings. One step is
one transformer forward over all of them: the transformer takes a timestep per sample, and
classifier-free guidance is per sample (an image with guidance adds its unconditional row to
the forward, an image without runs one row, as the pipeline would run it alone).

Each step is the pipeline's own code path, in its own order of operations: the same
scheduler class from the same config, the same latents from the same generator, the same
guidance formula, the same VAE decode and post-processing. What differs is only which
images share a forward, the tolerance of batched float32 (design note 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift


@dataclass(eq=False)
class ImagePrompt:
    """One image's text conditioning: its prompt's embeddings and, with guidance, its
    negative prompt's (each with a batch dimension of 1)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    negative_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    # Chroma: which of the padded text tokens are the prompt's (its attention mask).
    mask: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None


@dataclass(eq=False)
class ImageState:
    """One image in the loop: its latents and its own scheduler, at its own step."""

    latents: torch.Tensor
    scheduler: Any
    timesteps: torch.Tensor
    guidance_scale: float
    prompt: ImagePrompt
    step: int = 0  # steps done
    # FLUX: the positions of its packed latent's patches (the same for one size).
    positions: torch.Tensor | None = None
    # Its LoRA adapters and their scales (`batching.adapter_key`); () is the base model.
    adapters: tuple[tuple[str, float], ...] = ()
    # Its own cache state, by the cache hook that keeps each, where the model's cache is
    # decided per image (`loop/caches/`).
    caches: dict[object, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)

    @property
    def guided(self) -> bool:
        """Whether its forward has an unconditional row (SD3's classifier-free guidance)."""
        return self.prompt.negative_embeds is not None


class FlowFamily:
    """What the loop needs of a family: prompts encoded, images started, a step over many
    images, latents decoded. `view` is a per-request pipeline view (its own scheduler)."""

    # The most rows an image adds to a forward: two with classifier-free guidance (its
    # unconditional row beside its own), one where guidance is an input (FLUX).
    rows_per_image = 2

    def __init__(self, view: DiffusionPipeline) -> None:
        self.view = view
        self.device = view._execution_device

    def encode(
        self, prompts: list[str], negatives: list[str | None], guided: list[bool]
    ) -> list[ImagePrompt]:
        raise NotImplementedError

    def start(
        self, prompt: ImagePrompt, width: int, height: int, steps: int, guidance: float, seed: int
    ) -> ImageState:
        raise NotImplementedError

    def forward(self, images: list[ImageState]) -> list[torch.Tensor]:
        """Each image's noise prediction for its current step (one transformer call)."""
        raise NotImplementedError

    def guided(self, guidance_scale: float) -> bool:
        """Whether an image with this guidance scale runs classifier-free guidance (its
        negative prompt's row beside its own), as the family's pipeline decides it."""
        return guidance_scale > 1

    @staticmethod
    def negative_prompts(negatives: list[str | None], guided: list[bool]) -> list[str] | None:
        """The negative prompts to encode: none when no image is guided, else one per image,
        a missing one as "" (what SD3's, Chroma's and Z-Image's pipelines make of none)."""
        return [text or "" for text in negatives] if any(guided) else None

    def rows(self, images: list[ImageState]) -> list[ImageState]:
        """The image of each row of `forward`'s transformer batch, in order."""
        return images

    def spatial(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Latents as (B, C, h, w), for previews."""
        return latents

    def advance(self, image: ImageState, noise: torch.Tensor) -> None:
        """The scheduler's step for one image, as the pipeline takes it."""
        t = image.timesteps[image.step]
        image.latents = image.scheduler.step(noise, t, image.latents, return_dict=False)[0]
        image.step += 1

    def decode(self, latents: list[torch.Tensor], width: int, height: int) -> np.ndarray:
        """Finished images' latents to pixels in [0, 1], (B, H, W, 3), in one VAE call."""
        raise NotImplementedError

    def _scheduler(self) -> Any:
        scheduler = self.view.scheduler
        return type(scheduler).from_config(scheduler.config)

    def _vae_decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.view.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.view.image_processor.postprocess(image, output_type="np")

    def _initial_latents(
        self, channels: int, dtype: torch.dtype, width: int, height: int, seed: int
    ) -> Any:
        """The pipeline's own `prepare_latents` for one image, from its seed's generator,
        made as `call_arguments.py` makes it: on the CPU, so a seed gives the same noise on
        any device, and alone, so it does not depend on its batch neighbours."""
        generator = [torch.Generator("cpu").manual_seed(seed)]
        return self.view.prepare_latents(1, channels, height, width, dtype, self.device, generator)


def classifier_free(images: list[ImageState], output: torch.Tensor) -> list[torch.Tensor]:
    """Each image's noise from a forward over `rows(images)`: its own row, and for a guided
    image its unconditional row (they follow all the conditional ones, in the same order)
    combined by the pipelines' classifier-free guidance formula."""
    noise: list[torch.Tensor] = []
    unconditional = iter(range(len(images), len(output)))
    for index, image in enumerate(images):
        text = output[index : index + 1]
        if image.guided:
            k = next(unconditional)
            uncond = output[k : k + 1]
            text = uncond + image.guidance_scale * (text - uncond)
        noise.append(text)
    return noise


def timestep_shift(scheduler: Any, image_seq_len: int, max_shift: float) -> float:
    """The timestep shift for an image of this many patches, with the family pipeline's
    defaults (SD3's `max_shift` is 1.16, FLUX's 1.15)."""
    config = scheduler.config
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", max_shift),
    )
