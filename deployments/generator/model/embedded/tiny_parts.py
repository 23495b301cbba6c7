"""The parts several embedded models share: the seed their weights are drawn from, a VAE
with the real 8x downsampling, and the CLIP and T5 text encoders at toy sizes."""

from __future__ import annotations

from deployments.generator.model.embedded.tiny_tokenizers import CLIP_VOCAB_SIZE, T5_VOCAB_SIZE

# Every builder seeds torch with it before drawing its weights, in a fixed order.
SEED = 0


# A VAE with four blocks, for the real 8x downsampling (so sizes follow the real rules).
VAE_LAYOUT = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 256,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def tiny_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None):
    """`AutoencoderKL` in `VAE_LAYOUT`."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        **VAE_LAYOUT,
        latent_channels=latent_channels,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def clip_config(hidden_size: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )


def t5_encoder(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=T5_VOCAB_SIZE,
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
