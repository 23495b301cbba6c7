"""The tiny Qwen-Image: a transformer over 2x2 patches of a 5-D (video-style) VAE's latents,
normalised per channel, conditioned on a Qwen2.5-VL's last hidden states, guided by "true"
CFG with a negative prompt."""

from __future__ import annotations

from deployments.generator.model.embedded.tiny_parts import SEED
from deployments.generator.model.embedded.tiny_tokenizers import qwen_tokenizer


def build_tiny_qwen_image_pipeline():
    """A tiny Qwen-Image: a transformer over 2x2 patches of a 5-D (video-style) VAE's latents,
    conditioned on a Qwen2.5-VL's last hidden states, guided by "true" CFG."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(SEED)
    tokenizer = qwen_tokenizer()
    vocab = len(tokenizer)
    width = 16  # the text encoder's, which the transformer attends to
    text_config = {
        "hidden_size": width,
        "intermediate_size": width,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0,
        "vocab_size": vocab,
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = {
        "depth": 1, "hidden_size": width, "intermediate_size": width, "num_heads": 2,
        "out_hidden_size": width,
    }  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        hidden_size=width,
        vocab_size=vocab,
        # The image tokens of its vision tower (unused: prompts are text), within the vocabulary.
        vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 2,
        vision_token_id=vocab - 1,
    )
    pipeline = QwenImagePipeline(
        transformer=QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * 4,  # the VAE's 4 latent channels, 2x2 patches
            out_channels=4,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=width,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        ),
        vae=AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2, 4, 4],  # three halvings: the real 8x downsampling
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 2.0, 0.8, 1.2],
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
        tokenizer=tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
