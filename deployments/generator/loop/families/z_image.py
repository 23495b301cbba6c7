"""`ZImagePipeline`'s denoising taken apart for the continuous loop.

Z-Image differs from the other flow families in four ways the loop keeps:
- its transformer takes LISTS: each row's latents as (C, 1, h, w) and each row's prompt
  embeddings at their own length (only the prompt's tokens, no padding), so rows of
  different prompt lengths share a forward without padding them to one another;
- its timestep input is the flow time `(1000 - t) / 1000`, and its prediction is negated
  before the scheduler's step;
- classifier-free guidance runs for any `guidance_scale` > 0, by
  `pos + scale * (pos - neg)` (the pipeline's formula, not `neg + scale * (pos - neg)`),
  in float32;
- its latents start in float32 whatever the model's dtype.
The pipeline's `cfg_truncation` and `cfg_normalization` are left at their defaults (1.0 and
off, under which neither changes a step), as the request-level path leaves them.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.z_image.pipeline_z_image import (
    get_default_z_image_sigmas,
    retrieve_timesteps,
)

from deployments.generator.loop.families.flow_family import (
    FlowFamily,
    ImagePrompt,
    ImageState,
    timestep_shift,
)


class ZImageFamily(FlowFamily):
    def guided(self, guidance_scale: float) -> bool:
        return guidance_scale > 0  # the pipeline's `do_classifier_free_guidance`

    def encode(
        self, prompts: list[str], negatives: list[str | None], guided: list[bool]
    ) -> list[ImagePrompt]:
        # The pipeline writes each prompt's chat-templated text back into the list it is
        # given: it gets copies.
        embeds, negative = self.view.encode_prompt(
            prompt=list(prompts),
            negative_prompt=self.negative_prompts(negatives, guided),
            do_classifier_free_guidance=any(guided),
            device=self.device,
        )
        return [
            ImagePrompt(
                embeds=embeds[i],  # (tokens, width): this prompt's own length
                pooled=None,
                negative_embeds=negative[i] if guided[i] else None,
            )
            for i in range(len(prompts))
        ]

    def start(
        self, prompt: ImagePrompt, width: int, height: int, steps: int, guidance: float, seed: int
    ) -> ImageState:
        channels = self.view.transformer.in_channels
        latents = self._initial_latents(channels, torch.float32, width, height, seed)
        scheduler = self._scheduler()
        patches = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        timesteps, _ = retrieve_timesteps(
            scheduler,
            steps,
            self.device,
            sigmas=get_default_z_image_sigmas(steps),
            mu=timestep_shift(scheduler, patches, max_shift=1.15),
        )
        scheduler.set_begin_index(0)
        return ImageState(latents, scheduler, timesteps, guidance, prompt)

    def rows(self, images: list[ImageState]) -> list[ImageState]:
        return images + [image for image in images if image.guided]

    def forward(self, images: list[ImageState]) -> list[torch.Tensor]:
        transformer = self.view.transformer
        guided = [image for image in images if image.guided]
        rows = self.rows(images)
        timestep = torch.stack([image.timesteps[image.step] for image in rows])
        output = transformer(
            [image.latents.to(transformer.dtype)[0].unsqueeze(1) for image in rows],
            (1000 - timestep) / 1000,
            [i.prompt.embeds for i in images] + [i.prompt.negative_embeds for i in guided],
            return_dict=False,
        )[0]
        noise: list[torch.Tensor] = []
        unconditional = iter(range(len(images), len(rows)))
        for index, image in enumerate(images):
            prediction = output[index].float()
            if image.guided:
                negative = output[next(unconditional)].float()
                prediction = prediction + image.guidance_scale * (prediction - negative)
            noise.append(-prediction.squeeze(1).unsqueeze(0))
        return noise

    def advance(self, image: ImageState, noise: torch.Tensor) -> None:
        super().advance(image, noise.to(torch.float32))

    def decode(self, latents: list[torch.Tensor], width: int, height: int) -> np.ndarray:
        return self._vae_decode(torch.cat(latents).to(self.view.vae.dtype))
