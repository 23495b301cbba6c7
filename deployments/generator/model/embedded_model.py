"""The embedded models: tiny diffusers pipelines built from configs, with no download.

No machine that builds or tests this project can reach a model hub, so the service ships
recipes for miniature pipelines of six families instead, each the real architecture at toy
sizes with random weights from a fixed seed:
- `tiny-sd3`: `StableDiffusion3Pipeline` (MMDiT transformer, two CLIP encoders and T5);
- `tiny-sdxl`: `StableDiffusionXLPipeline` (UNet, two CLIP encoders);
- `tiny-flux`: `FluxPipeline` (flow-matching transformer with packed latents, CLIP and T5);
- `tiny-chroma`: `ChromaPipeline` (FLUX's layout without CLIP or guidance embedding: T5
  alone, real classifier-free guidance with a negative prompt);
- `tiny-qwen-image`: `QwenImagePipeline` (a Qwen2.5-VL text encoder with a byte-level BPE
  tokenizer, a video-style 5-D VAE normalised per channel, "true" CFG);
- `tiny-z-image`: `ZImagePipeline` (a single-stream transformer on a Qwen3 encoder's
  chat-templated prompt, classifier-free guidance).
Each is saved with `save_pretrained` and loaded back through the same `from_pretrained` path
as a real checkpoint, so every code path the service runs on a GPU is exercised on a laptop
CPU. Their images are noise.
"""

from __future__ import annotations

import shutil
import string
import tempfile
from pathlib import Path

from deployments.config.base import default_cache_dir

EMBEDDED_SCHEME = "embedded:"
EMBEDDED_MODELS = (
    "tiny-sd3",
    "tiny-sdxl",
    "tiny-flux",
    "tiny-chroma",
    "tiny-qwen-image",
    "tiny-z-image",
)
# Bump when a recipe changes, so caches built by an older version are not reused.
RECIPE_VERSION = 2

_SEED = 0
_CLIP_VOCAB_SIZE = 1000
_T5_VOCAB_SIZE = 200


def is_embedded(source: str) -> bool:
    """Whether a model `source` names an embedded model (`embedded:<name>`)."""
    return source.startswith(EMBEDDED_SCHEME)


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
        build_embedded_pipeline(name).save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is identical (same seed, same recipe).
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_embedded_pipeline(name: str):
    """Build embedded model `name` in memory, deterministically (same weights every time)."""
    builders = {
        "tiny-sd3": build_tiny_sd3_pipeline,
        "tiny-sdxl": build_tiny_sdxl_pipeline,
        "tiny-flux": build_tiny_flux_pipeline,
        "tiny-chroma": build_tiny_chroma_pipeline,
        "tiny-qwen-image": build_tiny_qwen_image_pipeline,
        "tiny-z-image": build_tiny_z_image_pipeline,
    }
    return builders[name]()


def _tiny_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None):
    """A VAE with four blocks, for the real 8x downsampling (so sizes follow the real rules)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=256,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _clip_config(hidden_size: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=_CLIP_VOCAB_SIZE,
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


def _t5_encoder(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=_T5_VOCAB_SIZE,
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


def build_tiny_sdxl_pipeline():
    """A tiny SDXL: a UNet with cross-attention and SDXL's micro-conditioning (text_time)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(_SEED)
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
        vae=_tiny_vae(latent_channels=4, scaling_factor=0.13025, shift_factor=None),
        text_encoder=CLIPTextModel(_clip_config(hidden_size=16, projection_dim=16)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(hidden_size=16, projection_dim=16)),
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(),
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

    torch.manual_seed(_SEED)
    transformer = FluxTransformer2DModel(
        **_FLUX_LAYOUT,
        pooled_projection_dim=16,  # CLIP's width
        guidance_embeds=guidance_embeds,
    )
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(latent_channels=4, scaling_factor=1.5035, shift_factor=0.0609),
        text_encoder=CLIPTextModel(_clip_config(hidden_size=16, projection_dim=16)),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder(d_model=32),
        tokenizer_2=_t5_tokenizer(),
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

    torch.manual_seed(_SEED)
    transformer = ChromaTransformer2DModel(
        **_FLUX_LAYOUT,
        approximator_num_channels=8,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    pipeline = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(latent_channels=4, scaling_factor=1.5035, shift_factor=0.0609),
        text_encoder=_t5_encoder(d_model=32),
        tokenizer=_t5_tokenizer(),
        transformer=transformer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


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

    torch.manual_seed(_SEED)
    tokenizer = _qwen_tokenizer()
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


def build_tiny_z_image_pipeline():
    """A tiny Z-Image: a single-stream transformer over 2x2 patches, conditioned on a Qwen3
    encoder's hidden states of the chat-templated prompt; classifier-free guidance."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(_SEED)
    tokenizer = _qwen_tokenizer()
    # The pipeline renders each prompt as a chat turn before tokenizing it.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
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
    # Its padding tokens start as `torch.empty`: fixed values, so a build is the same twice.
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
        vae=_tiny_vae(latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _qwen_tokenizer():
    """A Qwen2 byte-level BPE tokenizer with no merges, and the chat template's markers as
    special tokens: every string tokenizes."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(_byte_level_alphabet())}
    markers = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab.update({marker: len(vocab) + i for i, marker in enumerate(markers)})
    # Room for the vision tower's three token ids at the end of the vocabulary.
    vocab.update({f"<|vision_{i}|>": len(vocab) + i for i in range(3)})
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=markers[1:],
        model_max_length=1024,
    )


def build_tiny_sd3_pipeline():
    """Build the tiny SD3 pipeline in memory, deterministically (same weights every time)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(_SEED)
    # Text encoders: hidden sizes chosen so the joint embedding is 32 wide, like
    # caption_projection's input in the transformer (CLIP 2 x 16 padded to T5's 32). Built in
    # this order (both CLIPs, then T5, then the transformer and VAE) from the one seed: the
    # saved weights depend on it.
    text_encoder = CLIPTextModelWithProjection(_clip_config(hidden_size=16, projection_dim=16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(hidden_size=16, projection_dim=16))
    text_encoder_3 = _t5_encoder(d_model=32)
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
    vae = _tiny_vae(latent_channels=16, scaling_factor=1.5035, shift_factor=0.0609)
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
