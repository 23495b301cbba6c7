"""The tiny Z-Image: a single-stream transformer over 2x2 patches, conditioned on a Qwen3
encoder's hidden states of the chat-templated prompt; classifier-free guidance with a
negative prompt."""

from __future__ import annotations

from deployments.generator.model.embedded.tiny_parts import SEED, tiny_vae
from deployments.generator.model.embedded.tiny_tokenizers import QWEN_CHAT_TEMPLATE, qwen_tokenizer


def build_tiny_z_image_pipeline():
    """A tiny Z-Image: a single-stream transformer over 2x2 patches, conditioned on a Qwen3
    encoder's hidden states of the chat-templated prompt; classifier-free guidance."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(SEED)
    # The pipeline renders each prompt as a chat turn before tokenizing it.
    tokenizer = qwen_tokenizer(QWEN_CHAT_TEMPLATE)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,  # the VAE's latent channels
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=16,  # the text encoder's width
        axes_dims=[8, 4, 4],
        axes_lens=[1024, 64, 64],
    )
    # Its padding tokens start as `torch.empty` in some diffusers versions (zeros in others):
    # fixed values, so a build is the same twice, and the same on every version.
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipeline = ZImagePipeline(
        transformer=transformer,
        vae=tiny_vae(latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
