"""`FluxPipeline`'s and `ChromaPipeline`'s denoising taken apart for the continuous loop:
packed 2x2 latent patches with their positions, one schedule, one decode."""

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


class FluxFamily(FlowFamily):
    """`FluxPipeline`: packed latents, per-sample timesteps and distilled guidance (an input
    of the transformer, not doubled rows; the service runs no "true" guidance)."""

    rows_per_image = 1

    def encode(
        self, prompts: list[str], negatives: list[str | None], guided: list[bool]
    ) -> list[ImagePrompt]:
        embeds, pooled, _ids = self.view.encode_prompt(
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
        latents, positions = self._initial_latents(
            channels, prompt.embeds.dtype, width, height, seed
        )
        scheduler = self._scheduler()
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        timesteps, _ = retrieve_timesteps(
            scheduler,
            steps,
            self.device,
            sigmas=sigmas,
            mu=timestep_shift(scheduler, latents.shape[1], max_shift=1.15),
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
        text_ids = self._text_ids(first)
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

    def _text_ids(self, first: ImageState) -> torch.Tensor:
        """The text tokens' positions: all zero, one row a token of the (padded) prompt."""
        sequence = first.prompt.embeds.shape[1]
        return torch.zeros(sequence, 3).to(device=self.device, dtype=first.prompt.embeds.dtype)

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

    rows_per_image = 2

    def encode(
        self, prompts: list[str], negatives: list[str | None], guided: list[bool]
    ) -> list[ImagePrompt]:
        embeds, _ids, mask, negative, _negative_ids, negative_mask = self.view.encode_prompt(
            prompt=prompts,
            negative_prompt=self.negative_prompts(negatives, guided),
            do_classifier_free_guidance=any(guided),
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
        text_ids = self._text_ids(first)
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
        return classifier_free(images, output)
