"""The embedded model: a tiny Stable Diffusion 3 pipeline built from configs, with no download.

No machine that builds or tests this project can reach a model hub, so the service ships a
recipe for a miniature `StableDiffusion3Pipeline` instead: the real SD3 architecture (MMDiT
transformer, VAE, two CLIP text encoders and a T5 encoder, each with its tokenizer) at toy
sizes, with random weights from a fixed seed. It is saved with `save_pretrained` and loaded
back through the same `from_pretrained` path as a real checkpoint, so every code path the
service runs on a GPU is exercised on a laptop CPU. Its images are noise.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

EMBEDDED_SCHEME = "embedded:"
EMBEDDED_MODELS = ("tiny-sd3",)
# Bump when the recipe changes, so caches built by an older version are not reused.
RECIPE_VERSION = 1
CACHE_ENV_VAR = "IMAGE_SERVICE_CACHE"

_SEED = 0
_CLIP_VOCAB_SIZE = 1000
_T5_VOCAB_SIZE = 200


def is_embedded(source: str) -> bool:
    """Whether a model `source` names an embedded model (`embedded:<name>`)."""
    return source.startswith(EMBEDDED_SCHEME)


def default_cache_dir() -> Path:
    """Where embedded models are saved: `$IMAGE_SERVICE_CACHE`, else `~/.cache/image-service`."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "image-service"


def ensure_embedded_model(source: str, cache_dir: Path | None = None) -> Path:
    """Return the directory of the embedded model `source`, building and saving it if needed.

    The build writes into a temporary directory and renames it into place, so replicas that
    start at the same time never load a half-written model.
    """
    name = source.removeprefix(EMBEDDED_SCHEME)
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"unknown embedded model {source!r}; available: "
            + ", ".join(EMBEDDED_SCHEME + known for known in EMBEDDED_MODELS)
        )
    root = cache_dir or default_cache_dir()
    target = root / f"{name}-v{RECIPE_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build_tiny_sd3_pipeline().save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is identical (same seed, same recipe).
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_sd3_pipeline():
    """Build the tiny SD3 pipeline in memory, deterministically (same weights every time)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(_SEED)
    # Text encoders: hidden sizes chosen so the joint embedding is 32 wide, like
    # caption_projection's input in the transformer (CLIP 2 x 16 padded to T5's 32).
    clip_config = CLIPTextConfig(
        vocab_size=_CLIP_VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    text_encoder = CLIPTextModelWithProjection(clip_config)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=_T5_VOCAB_SIZE,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=64,
    )
    # Four blocks give the real 8x downsampling, so sizes follow SD3's rules (multiples of 16).
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=256,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=_t5_tokenizer(),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE uses to stand for the 256 byte values."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _clip_tokenizer():
    """A CLIP BPE tokenizer over a byte-level vocabulary: every string tokenizes, no merges."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _byte_level_alphabet():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    assert len(vocab) <= _CLIP_VOCAB_SIZE
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    """A T5 Unigram tokenizer over a small vocabulary of characters and word starts."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for char in string.ascii_lowercase + string.ascii_uppercase + string.digits:
        pieces.append(("▁" + char, -3.0))
        pieces.append((char, -4.0))
    for char in string.punctuation:
        pieces.append((char, -5.0))
    assert len(pieces) <= _T5_VOCAB_SIZE
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=256)
