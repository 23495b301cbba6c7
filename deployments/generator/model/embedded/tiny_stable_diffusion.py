"""The tiny Stable Diffusion families: SD3 (an MMDiT transformer on two CLIP encoders and
T5) and SDXL (a UNet on two CLIP encoders, with its micro-conditioning)."""

from __future__ import annotations

from deployments.generator.model.embedded.tiny_parts import SEED, clip_config, t5_encoder, tiny_vae
from deployments.generator.model.embedded.tiny_tokenizers import clip_tokenizer, t5_tokenizer


def build_tiny_sd3_pipeline():
    """Build the tiny SD3 pipeline in memory, deterministically (same weights every time)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(SEED)
    # Text encoders: hidden sizes chosen so the joint embedding is 32 wide, like
    # caption_projection's input in the transformer (CLIP 2 x 16 padded to T5's 32). Built in
    # this order (both CLIPs, then T5, then the transformer and VAE) from the one seed: the
    # saved weights depend on it.
    text_encoder = CLIPTextModelWithProjection(clip_config(hidden_size=16, projection_dim=16))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(hidden_size=16, projection_dim=16))
    text_encoder_3 = t5_encoder(d_model=32)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=16,
        pos_embed_max_size=64,
    )
    # 16 latent channels, as in SD3 (its inpainting pipeline requires them).
    vae = tiny_vae(latent_channels=16, scaling_factor=1.5035, shift_factor=0.0609)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer(),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_sdxl_pipeline():
    """A tiny SDXL: a UNet with cross-attention and SDXL's micro-conditioning (text_time)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(SEED)
    # Cross-attention sees both encoders' hidden states side by side (16 + 16); the added
    # embedding takes 6 time ids x 8 plus the second encoder's 16-wide pooled projection.
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32,
        norm_num_groups=4,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=tiny_vae(latent_channels=4, scaling_factor=0.13025, shift_factor=None),
        text_encoder=CLIPTextModel(clip_config(hidden_size=16, projection_dim=16)),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(hidden_size=16, projection_dim=16)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
