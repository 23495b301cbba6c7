"""SD3.5 Medium's architecture with random weights, saved with `save_pretrained`: a model the
GPU benchmark serves from a local directory, so no machine needs the gated checkpoint.

The transformer and the VAE are built from SD3.5 Medium's published configs
(`stabilityai/stable-diffusion-3.5-medium`, `transformer/config.json` and `vae/config.json`;
the values below agree with the copies public code carries of them, and the transformer
counts 2,243,171,520 parameters plus a 226,492,416-value positional table: the 2.5B the model
card announces). The text encoders are scaled down (one layer each, tiny vocabularies and the
embedded model's tokenizers) but keep the widths the transformer reads: CLIP-L 768 and
CLIP-G 1280 wide, whose pooled outputs make the 2048-wide `pooled_projection_dim`, and a T5
4096 wide (`joint_attention_dim`); the prompt is 77 CLIP tokens and 256 T5 tokens, as for
the real model. So the denoising loop and the VAE cost what they cost with the real weights;
the real T5-XXL (4.7B parameters, ~9.5 GB in bf16) and CLIP encoders are missing, which
leaves out their memory and a few tens of milliseconds of prompt encoding per request.

    python -m bench.gpu.model [--toy] [--device cuda] [--cache DIR]   # prints the directory
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from deployments.config.base import default_cache_dir
from deployments.generator.model.embedded.tiny_tokenizers import (
    CLIP_VOCAB_SIZE,
    T5_VOCAB_SIZE,
    clip_tokenizer,
    t5_tokenizer,
)

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json.
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
# stabilityai/stable-diffusion-3.5-medium, vae/config.json (the same VAE as SD3 Medium's).
SD35_MEDIUM_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
# The CPU smoke test's toy: the same classes and conditioning widths, 2 layers of 2 heads.
TOY_TRANSFORMER_CHANGES: dict[str, Any] = {
    "num_layers": 2,
    "num_attention_heads": 2,
    "caption_projection_dim": 128,  # = heads x head dim, as in the real config
    "dual_attention_layers": [0],
}
# The text encoders' widths are the real ones (CLIP ViT-L/14, OpenCLIP ViT-bigG/14, T5 v1.1
# XXL); depth, vocabulary and T5's heads and MLP are cut.
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20}
T5 = {"d_model": 4096, "d_kv": 64, "num_heads": 4, "d_ff": 1024, "num_layers": 1}
SCHEDULER_SHIFT = 3.0  # FlowMatchEulerDiscreteScheduler's shift in SD3's scheduler config
RECIPE_VERSION = 1


def transformer_config(toy: bool) -> dict[str, Any]:
    return {**SD35_MEDIUM_TRANSFORMER, **(TOY_TRANSFORMER_CHANGES if toy else {})}


def recipe(toy: bool, dtype: str) -> dict[str, Any]:
    """Everything the saved model depends on (its directory name is a hash of it)."""
    return {
        "version": RECIPE_VERSION,
        "transformer": transformer_config(toy),
        "vae": SD35_MEDIUM_VAE,
        "clip_l": CLIP_L,
        "clip_g": CLIP_G,
        "t5": T5,
        "dtype": dtype,
    }


def model_dir(toy: bool, dtype: str, cache_root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(recipe(toy, dtype), sort_keys=True).encode()).hexdigest()
    name = f"sd3.5-medium-random-{'toy' if toy else 'full'}-{digest[:10]}"
    return (cache_root or default_cache_dir()) / name


def _clip(width: dict[str, int]):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        num_hidden_layers=1,
        max_position_embeddings=77,
        projection_dim=width["hidden_size"],  # 768 and 1280: 2048 pooled together
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
        **width,
    )
    return CLIPTextModelWithProjection(config)


def _t5():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=T5_VOCAB_SIZE,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        **T5,
    )
    return T5EncoderModel(config)


def build_pipeline(toy: bool, device: str, dtype: str):
    """The pipeline in memory, with seeded random weights, initialised on `device`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    with torch.device(device):  # a 2.2B-parameter init is seconds on a GPU, minutes on a CPU
        pipeline = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**transformer_config(toy)),
            vae=AutoencoderKL(**SD35_MEDIUM_VAE),
            text_encoder=_clip(CLIP_L),
            text_encoder_2=_clip(CLIP_G),
            text_encoder_3=_t5(),
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(),
            tokenizer_3=t5_tokenizer(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
        )
    return pipeline.to(dtype=getattr(torch, dtype))


def ensure_model(toy: bool, device: str, dtype: str, cache_root: Path | None = None) -> Path:
    """The saved model's directory, built first if missing (staged, then renamed into place)."""
    target = model_dir(toy, dtype, cache_root)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        pipeline = build_pipeline(toy, device, dtype)
        pipeline.to("cpu").save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", action="store_true", help="2 layers of 2 heads (CPU smoke)")
    parser.add_argument("--device", default="cuda", help="where the weights are initialised")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--cache", type=Path, default=None, help="default: the service's cache")
    options = parser.parse_args(argv)
    print(ensure_model(options.toy, options.device, options.dtype, options.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
