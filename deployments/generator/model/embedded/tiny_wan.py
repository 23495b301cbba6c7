"""The tiny Wan 2.1: video models. A 3-D (causal, video) VAE that compresses 4 frames into one
latent frame and 8x8 pixels into one latent pixel, a transformer over 1x2x2 patches of its
latents, a UMT5 encoder of the prompt, and classifier-free guidance with a negative prompt.
Text-to-video (`WanPipeline`) and image-to-video (`WanImageToVideoPipeline`, Wan 2.1's kind:
the first frame's latents and mask beside the noise, and a CLIP vision encoder's hidden
states of the image as a second thing to attend to).

Sizes follow diffusers' own tests of Wan; the VAE keeps the real 8x spatial and 4x temporal
factors, so the frame and size rules a request is checked against are the real model's.
"""

from __future__ import annotations

from deployments.generator.model.embedded.tiny_parts import SEED
from deployments.generator.model.embedded.tiny_tokenizers import T5_VOCAB_SIZE, t5_tokenizer

LATENT_CHANNELS = 4
TEXT_WIDTH = 32  # UMT5's, which the transformer's text projection takes
IMAGE_WIDTH = 8  # the CLIP vision encoder's, which the I2V transformer's image projection takes
IMAGE_SIZE = 32  # the CLIP vision encoder's input (its processor resizes the image to it)


def _vae():
    """Wan's video VAE with three spatial halvings (8x) and two temporal ones (4x), at toy
    width; latents are normalised per channel by statistics that are not the identity's."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 2.0, 0.8, 1.2],
        scale_factor_temporal=4,
        scale_factor_spatial=8,
    )


def _transformer(in_channels: int, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_WIDTH,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=image_dim,
    )


def _text_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=T5_VOCAB_SIZE,
            d_model=TEXT_WIDTH,
            d_kv=8,
            d_ff=2 * TEXT_WIDTH,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()


def _scheduler():
    """The scheduler Wan 2.1's checkpoints ship: UniPC, multistep (it keeps state between
    steps: one shared by concurrent calls breaks), over flow-matching sigmas shifted by 3."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )


def build_tiny_wan_pipeline():
    """A tiny Wan 2.1 text-to-video: a transformer over 1x2x2 patches of a video VAE's
    latents, conditioned on UMT5's hidden states of the prompt; classifier-free guidance."""
    import torch
    from diffusers import WanPipeline

    torch.manual_seed(SEED)
    pipeline = WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_text_encoder(),
        vae=_vae(),
        scheduler=_scheduler(),
        transformer=_transformer(in_channels=LATENT_CHANNELS),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_wan_i2v_pipeline():
    """A tiny Wan 2.1 image-to-video: the text-to-video layout, whose transformer also takes
    the first frame's latents and a mask of the frames given (beside the noise) and attends
    to a CLIP vision encoder's hidden states of the image."""
    import torch
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(SEED)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=IMAGE_WIDTH,
            intermediate_size=2 * IMAGE_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=8,
        )
    ).eval()
    pipeline = WanImageToVideoPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_text_encoder(),
        vae=_vae(),
        scheduler=_scheduler(),
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        ),
        image_encoder=image_encoder,
        # The noise, the image's latents, and the mask: one channel per frame of the VAE's
        # temporal factor (4), so that it lines up with the latent frames.
        transformer=_transformer(in_channels=2 * LATENT_CHANNELS + 4, image_dim=IMAGE_WIDTH),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
