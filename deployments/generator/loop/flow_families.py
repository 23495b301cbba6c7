"""One denoising step over images that each run their own request: the arithmetic of the
flow-matching transformer families (SD3, FLUX, Chroma), taken apart from their pipelines'
`__call__`.

A diffusers pipeline call runs every image of its batch with one number of steps, one
guidance scale and one timestep per step. The continuous loop (`denoise_loop.py`) runs images
that joined at different steps with their own steps and guidance, so each image here keeps
what the pipeline keeps for its whole batch: its own scheduler (timesteps and sigmas for its
own `num_inference_steps`), its own guidance scale, its own prompt embeddings. One step is
one transformer forward over all of them: the transformer takes a timestep per sample, and
classifier-free guidance is per sample (an image with guidance > 1 adds its unconditional
row to the forward, an image without runs one row, as the pipeline would run it alone).

Each step is the pipeline's own code path, in its own order of operations: the same
scheduler class from the same config, the same latents from the same generator, the same
guidance formula, the same VAE decode and post-processing. What differs is only which
images share a forward, the tolerance of batched float32 (design note 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import ChromaPipeline, DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps


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
        self, channels: int, prompt: ImagePrompt, width: int, height: int, seed: int
    ) -> Any:
        """The pipeline's own `prepare_latents` for one image, from its seed's generator,
        made as `call_arguments.py` makes it: on the CPU, so a seed gives the same noise on
        any device, and alone, so it does not depend on its batch neighbours."""
        generator = [torch.Generator("cpu").manual_seed(seed)]
        return self.view.prepare_latents(
            1, channels, height, width, prompt.embeds.dtype, self.device, generator
        )


class SD3Family(FlowFamily):
    """`StableDiffusion3Pipeline`: per-sample timesteps, classifier-free guidance by doubled
    rows (unconditional rows after the conditional ones, as the pipeline concatenates)."""

    def encode(
        self, prompts: list[str], negatives: list[str | None], guided: list[bool]
    ) -> list[ImagePrompt]:
        any_guided = any(guided)
        # The pipeline turns a missing negative prompt into "" (`negative_prompt or ""`).
        embeds, negative, pooled, negative_pooled = self.view.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=[text or "" for text in negatives] if any_guided else None,
            do_classifier_free_guidance=any_guided,
            device=self.device,
        )
        return [
            ImagePrompt(
                embeds=embeds[i : i + 1],
                pooled=pooled[i : i + 1],
                negative_embeds=negative[i : i + 1] if guided[i] else None,
                negative_pooled=negative_pooled[i : i + 1] if guided[i] else None,
            )
            for i in range(len(prompts))
        ]

    def start(
        self, prompt: ImagePrompt, width: int, height: int, steps: int, guidance: float, seed: int
    ) -> ImageState:
        view = self.view
        channels = view.transformer.config.in_channels
        latents = self._initial_latents(channels, prompt, width, height, seed)
        scheduler = self._scheduler()
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = view.transformer.config.patch_size
            patches = (latents.shape[2] // patch) * (latents.shape[3] // patch)
            kwargs["mu"] = _shift(scheduler, patches, max_shift=1.16)
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, **kwargs)
        return ImageState(latents, scheduler, timesteps, guidance, prompt)

    def rows(self, images: list[ImageState]) -> list[ImageState]:
        return images + [image for image in images if image.guided]

    def forward(self, images: list[ImageState]) -> list[torch.Tensor]:
        guided = [image for image in images if image.guided]
        rows = self.rows(images)
        output = self.view.transformer(
            hidden_states=torch.cat(
                [image.latents for image in images] + [image.latents for image in guided]
            ),
            timestep=torch.stack([image.timesteps[image.step] for image in rows]),
            encoder_hidden_states=torch.cat(
                [i.prompt.embeds for i in images] + [i.prompt.negative_embeds for i in guided]
            ),
            pooled_projections=torch.cat(
                [i.prompt.pooled for i in images] + [i.prompt.negative_pooled for i in guided]
            ),
            return_dict=False,
        )[0]
        return _guided(images, output)

    def decode(self, latents: list[torch.Tensor], width: int, height: int) -> np.ndarray:
        return self._vae_decode(torch.cat(latents))


class FluxFamily(FlowFamily):
    """`FluxPipeline`: packed latents, per-sample timesteps and distilled guidance (an input
    of the transformer, not doubled rows; the service runs no "true" guidance)."""

    def encode(
        self, prompts: list[str], negatives: list[str | None], guided: list[bool]
    ) -> list[ImagePrompt]:
        embeds, pooled, _text_ids = self.view.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device
        )
        return [
            ImagePrompt(embeds=embeds[i : i + 1], pooled=pooled[i : i + 1])
            for i in range(len(prompts))
        ]

    def start(
        self, prompt: ImagePrompt, width: int, height: int, steps: int, guidance: float, seed: int
    ) -> ImageState:
        channels = self.view.transformer.config.in_channels // 4  # before packing 2x2
        latents, positions = self._initial_latents(channels, prompt, width, height, seed)
        scheduler = self._scheduler()
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        timesteps, _ = retrieve_timesteps(
            scheduler,
            steps,
            self.device,
            sigmas=sigmas,
            mu=_shift(scheduler, latents.shape[1], max_shift=1.15),
        )
        scheduler.set_begin_index(0)
        return ImageState(latents, scheduler, timesteps, guidance, prompt, positions=positions)

    def forward(self, images: list[ImageState]) -> list[torch.Tensor]:
        view = self.view
        latents = torch.cat([image.latents for image in images])
        first = images[0]
        guidance = None
        if view.transformer.config.guidance_embeds:
            guidance = torch.tensor(
                [image.guidance_scale for image in images], device=self.device, dtype=torch.float32
            )
        sequence = first.prompt.embeds.shape[1]
        text_ids = torch.zeros(sequence, 3).to(device=self.device, dtype=first.prompt.embeds.dtype)
        timestep = torch.stack([image.timesteps[image.step] for image in images])
        output = view.transformer(
            hidden_states=latents,
            timestep=timestep.to(latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=torch.cat([image.prompt.pooled for image in images]),
            encoder_hidden_states=torch.cat([image.prompt.embeds for image in images]),
            txt_ids=text_ids,
            img_ids=first.positions,  # the same for every image of a size
            joint_attention_kwargs={},
            return_dict=False,
        )[0]
        return [output[i : i + 1] for i in range(len(images))]

    def spatial(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        view = self.view
        return view._unpack_latents(latents, height, width, view.vae_scale_factor)

    def decode(self, latents: list[torch.Tensor], width: int, height: int) -> np.ndarray:
        view = self.view
        unpacked = view._unpack_latents(torch.cat(latents), height, width, view.vae_scale_factor)
        return self._vae_decode(unpacked)


class ChromaFamily(FluxFamily):
    """`ChromaPipeline`: FLUX's packed latents, schedule and decode, with T5 alone (its
    padding masked in attention) and real classifier-free guidance: an image with guidance
    > 1 adds its negative prompt's row to the forward (the pipeline runs a second forward;
    one forward over both rows is the same arithmetic)."""

    def encode(
        self, prompts: list[str], negatives: list[str | None], guided: list[bool]
    ) -> list[ImagePrompt]:
        any_guided = any(guided)
        embeds, _ids, mask, negative, _negative_ids, negative_mask = self.view.encode_prompt(
            prompt=prompts,
            # The pipeline turns a missing negative prompt into "" (`negative_prompt or ""`).
            negative_prompt=[text or "" for text in negatives] if any_guided else None,
            do_classifier_free_guidance=any_guided,
            device=self.device,
        )
        return [
            ImagePrompt(
                embeds=embeds[i : i + 1],
                pooled=None,
                mask=mask[i : i + 1],
                negative_embeds=negative[i : i + 1] if guided[i] else None,
                negative_mask=negative_mask[i : i + 1] if guided[i] else None,
            )
            for i in range(len(prompts))
        ]

    def rows(self, images: list[ImageState]) -> list[ImageState]:
        return images + [image for image in images if image.guided]

    def forward(self, images: list[ImageState]) -> list[torch.Tensor]:
        view = self.view
        guided = [image for image in images if image.guided]
        rows = self.rows(images)
        first = images[0]
        latents = torch.cat([image.latents for image in rows])
        image_tokens = latents.shape[1]
        masks = [i.prompt.mask for i in images] + [i.prompt.negative_mask for i in guided]
        attention_mask = torch.cat(
            [view._prepare_attention_mask(1, image_tokens, latents.dtype, mask) for mask in masks]
        )
        sequence = first.prompt.embeds.shape[1]
        text_ids = torch.zeros(sequence, 3).to(device=self.device, dtype=first.prompt.embeds.dtype)
        timestep = torch.stack([image.timesteps[image.step] for image in rows])
        output = view.transformer(
            hidden_states=latents,
            timestep=timestep.to(latents.dtype) / 1000,
            encoder_hidden_states=torch.cat(
                [i.prompt.embeds for i in images] + [i.prompt.negative_embeds for i in guided]
            ),
            txt_ids=text_ids,
            img_ids=first.positions,  # the same for every image of a size
            attention_mask=attention_mask,
            joint_attention_kwargs={},
            return_dict=False,
        )[0]
        return _guided(images, output)


def _guided(images: list[ImageState], output: torch.Tensor) -> list[torch.Tensor]:
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


def _shift(scheduler: Any, image_seq_len: int, max_shift: float) -> float:
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


def family_of(view: DiffusionPipeline) -> FlowFamily | None:
    """The step arithmetic for the view's pipeline class, or None where the continuous loop
    does not run it (SDXL and other UNet families, edits: their requests run per call)."""
    if type(view) is StableDiffusion3Pipeline:
        return SD3Family(view)
    if type(view) is FluxPipeline and view.transformer.config.guidance_embeds:
        # A FLUX without a guidance embedding is guided by "true" CFG (`true_cfg_scale`, its
        # negative prompt in a second forward), which the loop does not run: it runs per call.
        return FluxFamily(view)
    if type(view) is ChromaPipeline:
        return ChromaFamily(view)
    return None
