"""A model's `optimizations:` (`args.models[].optimizations` in a Serve config): the speed
levers of its generator replicas. All are off by default; the GPU config chooses.

Shared by both sides like the rest of the args: the generator applies them (see
`deployments/generator/model/optimizations.py`), the ingress only reads the config.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from deployments.config.base import Strict


class CompileConfig(Strict):
    """Regional `torch.compile` of the denoiser's repeated blocks, warmed up at start."""

    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        Field(default="default", description="torch.compile's `mode`.")
    )
    warmup_sizes: list[str] | None = Field(
        default=None,
        description="Sizes (`WxH`) compiled and run before the replica reports ready; by "
        "default the model's `default_size`. Other sizes compile on first use (logged).",
    )
    warmup_batch_sizes: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        description="Images per call compiled at each warm-up size; by default 1 and the "
        "largest batch the model's batching allows at that size.",
    )

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes(cls, value: list[str] | None) -> list[str] | None:
        for size in value or []:
            width, _, height = size.partition("x")
            if not (width.isdigit() and height.isdigit() and int(width) and int(height)):
                raise ValueError(f"{size!r} is not a size `WxH`")
        return value


CacheKind = Literal["first_block", "taylorseer", "magcache", "pyramid_attention_broadcast"]


class CacheConfig(Strict):
    """diffusers' cache hooks (skip transformer work between similar steps). Lossy: a cached
    image differs a little from the uncached one."""

    kind: CacheKind = Field(description="Which of diffusers' caches.")
    threshold: float | None = Field(
        default=None,
        gt=0,
        description="The cache's threshold (`first_block`, `magcache`): larger skips more.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Other keyword arguments of the diffusers config class of `kind` "
        "(`FirstBlockCacheConfig`, `TaylorSeerCacheConfig`, `MagCacheConfig`, "
        "`PyramidAttentionBroadcastConfig`).",
    )


class OptimizationsConfig(Strict):
    """The speed levers of one model's replicas. Unknown or unavailable ones fail the
    replica's start with a message naming them, never a request."""

    compile: bool | CompileConfig = Field(
        default=False,
        description="`true` (or `{mode, warmup_sizes, warmup_batch_sizes}`): regional "
        "torch.compile of the denoiser's repeated blocks, warmed up before the replica "
        "reports ready.",
    )
    cache: CacheConfig | None = Field(
        default=None, description="A diffusers cache (`{kind, threshold, options}`); lossy."
    )
    attention_backend: str | None = Field(
        default=None,
        description="diffusers' attention backend (`native`, `flash`, `sage`, `flex`, ...); a "
        "backend whose kernel is not installed fails the replica's start.",
    )
    quantization: Literal["int8_weight_only", "int8_dynamic", "float8_weight_only"] | None = Field(
        default=None,
        description="torchao weight quantization of the denoiser at load (diffusers' "
        "`TorchAoConfig`). float8 needs a GPU of compute capability 8.9 or more.",
    )
    vae_tiling: bool = Field(
        default=False, description="Decode large images in tiles (less memory, a bit slower)."
    )
    vae_slicing: bool = Field(
        default=False, description="Decode a batch one image at a time (less memory)."
    )

    @property
    def compile_config(self) -> CompileConfig | None:
        if self.compile is True:
            return CompileConfig()
        return self.compile or None

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from diffusers.models.attention_dispatch import AttentionBackendName

        known = [backend.value for backend in AttentionBackendName]
        if value not in known:
            raise ValueError(f"unknown attention backend {value!r}; diffusers has {known}")
        return value
