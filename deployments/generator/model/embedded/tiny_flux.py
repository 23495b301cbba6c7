"""The tiny FLUX.1 layout: FLUX (guidance-embedded, CLIP and T5) and Chroma (FLUX's
transformer with a modulation approximator, T5 alone, classifier-free guidance)."""

from __future__ import annotations

from deployments.generator.model.embedded.tiny_parts import SEED, clip_config, t5_encoder, tiny_vae
from deployments.generator.model.embedded.tiny_tokenizers import clip_tokenizer, t5_tokenizer

# The transformer of tiny FLUX and tiny Chroma (Chroma is FLUX's layout).
_FLUX_LAYOUT = {
    "patch_size": 1,
    "in_channels": 4 * 4,  # the VAE's 4 latent channels, packed 2x2
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,  # T5's width
    "axes_dims_rope": (4, 4, 8),
}


def build_tiny_flux_pipeline(guidance_embeds: bool = True):
    """A tiny FLUX: a flow-matching transformer over 2x2-packed latents, with guidance
    embedding (like FLUX.1-dev; without, guided by "true" CFG, as the tests build one), a
    CLIP encoder for the pooled prompt and T5 for the rest."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        **_FLUX_LAYOUT,
        pooled_projection_dim=16,  # CLIP's width
        guidance_embeds=guidance_embeds,
    )
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(latent_channels=4, scaling_factor=1.5035, shift_factor=0.0609),
        text_encoder=CLIPTextModel(clip_config(hidden_size=16, projection_dim=16)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(d_model=32),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_chroma_pipeline():
    """A tiny Chroma: FLUX's packed-latent transformer with a modulation approximator instead
    of a guidance embedding, T5 alone, and classifier-free guidance with negative prompts."""
    import torch
    from diffusers import (
        ChromaPipeline,
        ChromaTransformer2DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    torch.manual_seed(SEED)
    transformer = ChromaTransformer2DModel(
        **_FLUX_LAYOUT,
        approximator_num_channels=8,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    pipeline = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(latent_channels=4, scaling_factor=1.5035, shift_factor=0.0609),
        text_encoder=t5_encoder(d_model=32),
        tokenizer=t5_tokenizer(),
        transformer=transformer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
