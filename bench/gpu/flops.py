"""The work an SD3 transformer (MMDiT) does per image, counted from its config, and the floor
that sets on a device's dense bf16 rate.

Per forward and image, a linear layer costs 2 x its weights x the tokens it is applied to, and
an attention 4 x L^2 x d (Q.K^T and the weighted sum of V, 2 x L^2 x d each). In SD3's joint
blocks each stream has its own weights: the image stream's apply to the image tokens, the
text stream's to the 333 text tokens only, and the AdaLN modulations and the timestep and
pooled-text embedders apply once per image. (Counting every weight on every token, as a quick
estimate does, doubles the total.) Checked against torch's FlopCounterMode on the real
architecture (tests/unit/test_gpu_bench.py). Prompt encoding and the VAE's decode are left out:
under 1% of the total at 1024x1024.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CLIP_TOKENS = 77  # SD3's CLIP tokenizers' model_max_length
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
TEXT_TOKENS = CLIP_TOKENS + T5_TOKENS
VAE_SCALE = 8  # the VAE downsamples 8x (four blocks)
TIMESTEP_CHANNELS = 256  # diffusers' SD3 timestep projection
H100_DATASHEET_TFLOPS = 989.0  # NVIDIA H100 SXM / H200: dense bf16 (1979 with sparsity)


@dataclass(frozen=True)
class TransformerFlops:
    """FLOPs of one forward for one image, by where they come from."""

    layers: int
    width: int  # d: heads x head dim
    image_tokens: int
    text_tokens: int
    image_weights: int  # linear weights applied to each image token
    text_weights: int  # ... to each text token
    vector_weights: int  # ... once per image
    attention: int

    @property
    def linear(self) -> int:
        return 2 * (
            self.image_weights * self.image_tokens
            + self.text_weights * self.text_tokens
            + self.vector_weights
        )

    @property
    def per_forward(self) -> int:
        return self.linear + self.attention

    def per_image(self, steps: int, guidance: bool = True) -> int:
        """Classifier-free guidance runs each step on the prompt and the negative prompt."""
        return self.per_forward * steps * (2 if guidance else 1)

    @property
    def quick_estimate(self) -> int:
        """2 x every weight x every token, plus the joint attention: the estimate that applies
        each weight to every token (for comparison only)."""
        weights = self.image_weights + self.text_weights + self.vector_weights
        tokens = self.image_tokens + self.text_tokens
        return 2 * weights * tokens + self.joint_attention

    @property
    def joint_attention(self) -> int:
        return self.layers * 4 * (self.image_tokens + self.text_tokens) ** 2 * self.width


def transformer_flops(
    config: Mapping[str, Any], width: int, height: int, text_tokens: int = TEXT_TOKENS
) -> TransformerFlops:
    """The FLOPs of one forward of an `SD3Transformer2DModel` with `config`, for one image of
    `width` x `height` pixels."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"]
    dual = [i for i in config.get("dual_attention_layers") or [] if i < layers]
    patch = config["patch_size"]
    image_tokens = (width // VAE_SCALE // patch) * (height // VAE_SCALE // patch)
    patch_values = patch * patch * config["in_channels"]
    out_values = patch * patch * (config.get("out_channels") or config["in_channels"])
    # Image stream: q, k, v, out (4 d^2) and the MLP (d -> 4d -> d: 8 d^2) in every block, a
    # second attention (4 d^2) in the dual-attention ones; the patch embedding and proj_out.
    image_weights = layers * 12 * d * d + len(dual) * 4 * d * d + (patch_values + out_values) * d
    # Text stream: q, k, v in every block; out and the MLP in all but the last, which only
    # lends its keys and values (context_pre_only); the context embedder.
    text_weights = layers * 3 * d * d + (layers - 1) * 9 * d * d + config["joint_attention_dim"] * d
    # Once per image: AdaLN modulations (6 d outputs, 9 d in dual-attention blocks; the last
    # block's text stream 2 d), the output norm (2 d), the timestep and pooled-text embedders.
    modulations = (layers * 6 + len(dual) * 3 + (layers - 1) * 6 + 2 + 2) * d * d
    embedders = (TIMESTEP_CHANNELS + d + config["pooled_projection_dim"] + d) * d
    tokens = image_tokens + text_tokens
    attention = 4 * d * (layers * tokens**2 + len(dual) * image_tokens**2)
    return TransformerFlops(
        layers=layers,
        width=d,
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        image_weights=image_weights,
        text_weights=text_weights,
        vector_weights=modulations + embedders,
        attention=attention,
    )


def derivation(
    config: Mapping[str, Any], size: str, steps: int, peak_tflops: float | None
) -> tuple[int, list[str]]:
    """FLOPs per image at `size` and `steps` with guidance, and the lines that derive them
    (with the floor they set at `peak_tflops`, unless None)."""
    width, height = (int(side) for side in size.split("x"))
    f = transformer_flops(config, width, height)
    layers, dual = config["num_layers"], len(config.get("dual_attention_layers") or [])
    total = f.per_image(steps)
    lines = [
        f"FLOPs per image: SD3 transformer {layers} layers, {size}, {steps} steps, CFG",
        f"  d = {config['num_attention_heads']} heads x {config['attention_head_dim']} = "
        f"{f.width}; image tokens ({width}/{VAE_SCALE}/{config['patch_size']}) x "
        f"({height}/{VAE_SCALE}/{config['patch_size']}) = {f.image_tokens}; text tokens "
        f"{CLIP_TOKENS} CLIP + {T5_TOKENS} T5 = {f.text_tokens}; "
        f"L = {f.image_tokens + f.text_tokens}",
        f"  weights per image token {f.image_weights / 1e6:.1f} M, per text token "
        f"{f.text_weights / 1e6:.1f} M, once per image {f.vector_weights / 1e6:.1f} M",
        f"  linear    2 x ({f.image_weights / 1e6:.1f}M x {f.image_tokens} + "
        f"{f.text_weights / 1e6:.1f}M x {f.text_tokens} + {f.vector_weights / 1e6:.1f}M) = "
        f"{_flop(f.linear)}",
        f"  attention 4 x d x ({layers} x L^2 + {dual} dual x {f.image_tokens}^2) = "
        f"{_flop(f.attention)}",
        f"  per forward {_flop(f.per_forward)} x {steps} steps x 2 (CFG) = {_flop(total)}",
        f"  (every weight on every token, 2 x params x L + 4 L^2 d x {layers}, would say "
        f"{_flop(f.quick_estimate * steps * 2)}: AdaLN weights act once per image "
        "and text weights on text tokens only)",
    ]
    if peak_tflops:
        floor_s = total / (peak_tflops * 1e12)
        lines.insert(
            -1,
            f"  floor at {peak_tflops:.0f} TFLOP/s dense bf16: {floor_s:.4g} s/image "
            f"({1 / floor_s:.3g} images/s); at the H100 SXM/H200 datasheet's "
            f"{H100_DATASHEET_TFLOPS:.0f}: {total / (H100_DATASHEET_TFLOPS * 1e12):.4g} s",
        )
    return total, lines


def _flop(value: float) -> str:
    """FLOPs with a unit that keeps a toy model's counts readable."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if value >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value / 1e6:.3f} MFLOP"


def fraction_of_peak(images_per_s: float, flops_per_image: int, peak_tflops: float) -> float:
    """The share of the device's dense bf16 rate that a throughput amounts to."""
    return images_per_s * flops_per_image / (peak_tflops * 1e12)
