"""The tiny FLUX.2 Klein: FLUX.2's transformer over 2x2-patchified latents packed with
position ids, a VAE that normalises its patchified latents with batch-norm statistics, and a
Qwen3 causal LM whose hidden states of three layers, side by side, are the prompt's
embedding; classifier-free guidance against an empty prompt (Klein takes no negative one)."""

from __future__ import annotations

from deployments.generator.model.embedded.tiny_parts import SEED, VAE_LAYOUT
from deployments.generator.model.embedded.tiny_tokenizers import QWEN3_CHAT_TEMPLATE, qwen_tokenizer

# The pipeline reads the hidden states of layers 9, 18 and 27 (`text_encoder_out_layers`),
# so the encoder is that deep, though as narrow as the others; one attention head, as every
# prompt is padded to 512 tokens and attention over them is most of the model's time.
_TEXT_LAYERS = 28
_TEXT_WIDTH = 16
_LATENT_CHANNELS = 4


def build_tiny_flux2_klein_pipeline():
    """A tiny FLUX.2 Klein, not step-distilled (`is_distilled=False`), so a guidance scale
    above 1 runs real classifier-free guidance."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(SEED)
    tokenizer = qwen_tokenizer(QWEN3_CHAT_TEMPLATE)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=_TEXT_WIDTH,
            intermediate_size=_TEXT_WIDTH,
            num_hidden_layers=_TEXT_LAYERS,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=_TEXT_WIDTH,
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * _LATENT_CHANNELS,  # the VAE's latent channels, patchified 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * _TEXT_WIDTH,  # three layers' hidden states side by side
        axes_dims_rope=(4, 4, 4, 4),  # (time, height, width, sequence): the head's 16
        guidance_embeds=False,
    )
    pipeline = Flux2KleinPipeline(
        # Klein shifts its schedule by the image's sequence length (it passes `mu`).
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=_tiny_flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _tiny_flux2_vae():
    """FLUX.2's VAE in `VAE_LAYOUT` (the real 8x downsampling). Its batch norm's running
    statistics, by which the pipeline normalises patchified latents, get fixed values away
    from the identity's (0 and 1), so decoding visibly depends on them."""
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(**VAE_LAYOUT, latent_channels=_LATENT_CHANNELS)
    channels = vae.bn.num_features  # the latent channels x the 2x2 patch
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.4, 0.4, channels))
        vae.bn.running_var.copy_(torch.linspace(0.25, 2.25, channels))
    return vae
