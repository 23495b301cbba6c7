"""`StableDiffusion3Pipeline`'s denoising taken apart for the continuous loop."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

from deployments.generator.loop.families.flow_family import (
    FlowFamily,
    ImagePrompt,
    ImageState,
    classifier_free,
    timestep_shift,
)


class SD3Family(FlowFamily):
    """`StableDiffusion3Pipeline`: per-sample timesteps, classifier-free guidance by doubled
    rows (unconditional rows after the conditional ones, as the pipeline concatenates)."""

    def encode(
        self, prompts: list[str], negatives: list[str | None], guided: list[bool]
    ) -> list[ImagePrompt]:
        embeds, negative, pooled, negative_pooled = self.view.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=self.negative_prompts(negatives, guided),
            do_classifier_free_guidance=any(guided),
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
        latents = self._initial_latents(channels, prompt.embeds.dtype, width, height, seed)
        scheduler = self._scheduler()
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = view.transformer.config.patch_size
            patches = (latents.shape[2] // patch) * (latents.shape[3] // patch)
            kwargs["mu"] = timestep_shift(scheduler, patches, max_shift=1.16)
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
        return classifier_free(images, output)

    def decode(self, latents: list[torch.Tensor], width: int, height: int) -> np.ndarray:
        return self._vae_decode(torch.cat(latents))
