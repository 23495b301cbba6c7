"""The speed levers of a replica (`models[].optimizations`, see
`deployments/config/optimizations_config.py`), applied once at start, while no call runs.

Every lever changes the ONE pipeline that all concurrent calls share (design note 9), so each
is set before the first view exists and never again; none keeps per-call state:
- `quantization`: the denoiser's linear weights become torchao int8 (or float8) tensors, at
  load, through diffusers' `TorchAoConfig`. Read-only afterwards.
- `attention_backend`: diffusers' attention dispatcher calls the chosen kernel. The choice is
  a field of each attention processor (and diffusers also records it process-wide), set once.
- `vae_tiling` / `vae_slicing`: flags on the shared VAE; each decode reads them and keeps its
  tiles or slices to itself.
- `compile`: regional `torch.compile` of the denoiser's repeated blocks. Compiling is lazy, so
  `deployments/generator/calls/warmup.py` runs every configured shape before the replica is ready.
An option that cannot work here raises `OptimizationUnavailable` at start, naming it: Serve
then reports a replica that failed to start with that message, rather than failing requests.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from deployments.config.optimizations_config import CompileConfig, OptimizationsConfig
from deployments.generator.model.components import DENOISER_NAMES, denoiser_of

logger = logging.getLogger("ray.serve")

# The component that denoises (and takes nearly all of the compute): a transformer (SD3,
# FLUX) or a UNet (SDXL).

# Each `quantization` value as torchao's config class.
_TORCHAO_CONFIGS = {
    "int8_weight_only": "Int8WeightOnlyConfig",
    "int8_dynamic": "Int8DynamicActivationInt8WeightConfig",
    "float8_weight_only": "Float8WeightOnlyConfig",
}

# Where models without diffusers' `_repeated_blocks` (SD3's transformer) keep their blocks.
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")

# Regional compilation puts every block variant (SD3's last block differs from the others,
# SDXL's blocks come in several widths) at every compiled shape on ONE code object, the block
# class's `forward`. Past dynamo's default of 8 entries it silently runs the block eagerly.
_RECOMPILE_LIMIT = 64


class OptimizationUnavailable(RuntimeError):
    """An option of `optimizations` cannot work on this replica; raised at its start."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"optimizations.{option}: {reason}")
        self.option = option


def quantization_config(
    options: OptimizationsConfig, source: str | Path, revision: str | None, device: torch.device
) -> Any | None:
    """The `quantization_config` argument of the pipeline's `from_pretrained`: torchao
    quantization of the denoiser only (the text encoders run once per call, the denoiser at
    every step), or None when `options` asks for none."""
    kind = options.quantization
    if kind is None:
        return None
    if kind == "float8_weight_only":
        _require_float8(device)
    try:
        import torchao.quantization
        from diffusers import PipelineQuantizationConfig, TorchAoConfig
    except ImportError as error:
        raise OptimizationUnavailable("quantization", f"{kind} needs torchao: {error}") from error
    # Which component denoises, from the checkpoint's model_index.json: diffusers warns about
    # (and ignores) a mapping that names a component the pipeline lacks.
    components = DiffusionPipeline.load_config(source, revision=revision)
    denoiser = next((name for name in DENOISER_NAMES if name in components), None)
    if denoiser is None:
        raise OptimizationUnavailable("quantization", f"{source} has no transformer or unet")
    torchao_config = getattr(torchao.quantization, _TORCHAO_CONFIGS[kind])()
    logger.info("quantizing the %s with torchao's %s", denoiser, type(torchao_config).__name__)
    return PipelineQuantizationConfig(quant_mapping={denoiser: TorchAoConfig(torchao_config)})


def _require_float8(device: torch.device) -> None:
    """float8 matrix multiplication needs CUDA compute capability 8.9 (Ada, Hopper) or more;
    elsewhere torchao would fail (or crawl) at the first call, not at load."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability >= (8, 9):
            return
        where = f"a GPU of compute capability {capability[0]}.{capability[1]}"
    else:
        where = device.type
    raise OptimizationUnavailable(
        "quantization",
        f"float8_weight_only needs a CUDA GPU of compute capability 8.9 or more; this replica "
        f"runs on {where}",
    )


def apply_at_load(pipeline: Any, options: OptimizationsConfig) -> None:
    """The levers that are module state (attention backend, VAE tiling and slicing), set on
    the freshly loaded shared pipeline. Quantization happens inside `from_pretrained`;
    compilation comes with the warm-up (`deployments/generator/calls/warmup.py`)."""
    if options.attention_backend is not None:
        set_attention_backend(denoiser_of(pipeline), options.attention_backend)
    vae = getattr(pipeline, "vae", None)
    for option, enable in (("vae_tiling", "enable_tiling"), ("vae_slicing", "enable_slicing")):
        if not getattr(options, option):
            continue
        if not callable(getattr(vae, enable, None)):
            raise OptimizationUnavailable(option, f"{type(vae).__name__} has no {enable}()")
        getattr(vae, enable)()
        logger.info("the VAE decodes with %s", option)


def set_attention_backend(denoiser: torch.nn.Module, name: str) -> None:
    """Route the denoiser's attention through diffusers' dispatcher to `name`, after checking
    that the kernel is installed (diffusers' own check) and runs on this device and dtype (one
    small attention call): a missing kernel fails the start, not the first request."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
        dispatch_attention_fn,
    )

    attention = [m for m in denoiser.modules() if getattr(m, "processor", None) is not None]
    dispatched = [m for m in attention if hasattr(m.processor, "_attention_backend")]
    if not dispatched:
        processors = sorted({type(m.processor).__name__ for m in attention})
        if name == "native":
            # What these processors run anyway: torch's scaled_dot_product_attention.
            return
        raise OptimizationUnavailable(
            "attention_backend",
            f"{type(denoiser).__name__}'s attention ({', '.join(processors)}) does not go "
            f"through diffusers' attention dispatcher, so {name!r} would never be used; only "
            "'native' applies to it",
        )
    # diffusers also makes the backend its process-wide default: a refused one must not stay
    # the default (later pipelines in the process would dispatch to a kernel that cannot run).
    previous = _AttentionBackendRegistry._active_backend
    try:
        denoiser.set_attention_backend(name)
        query = _probe_query(dispatched[0])
        with torch.no_grad():
            dispatch_attention_fn(query, query, query, backend=AttentionBackendName(name))
    except Exception as error:
        denoiser.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(previous)
        raise OptimizationUnavailable(
            "attention_backend", f"the {name!r} backend cannot run here: {error}"
        ) from error
    logger.info("attention runs on diffusers' %r backend", name)


def _probe_query(attention: torch.nn.Module) -> torch.Tensor:
    """A small (batch, tokens, heads, head size) query of the module's own head size, dtype
    and device: kernels differ in which of those they take (flash: 16-bit, head size <= 256)."""
    weight = attention.to_q.weight
    heads = int(getattr(attention, "heads", 1))
    head_size = attention.to_q.out_features // heads
    return torch.randn(1, 16, heads, head_size, dtype=weight.dtype, device=weight.device)


def repeated_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks the denoiser repeats: those its class names in diffusers'
    `_repeated_blocks` (FLUX's transformer, SDXL's UNet), else those of its
    `transformer_blocks` and `single_transformer_blocks` (SD3's transformer)."""
    names = getattr(denoiser, "_repeated_blocks", None) or ()
    if names:
        return [module for module in denoiser.modules() if type(module).__name__ in names]
    return [block for attr in _BLOCK_LISTS for block in getattr(denoiser, attr, None) or ()]


def compile_blocks(
    denoiser: torch.nn.Module, config: CompileConfig, backend: str = "inductor"
) -> int:
    """Regional compilation: each repeated block gets `torch.compile` (compiled lazily, at
    its first call at each shape). Identical blocks share one compiled graph, so this compiles
    in a fraction of the whole model's time for about the same speed-up. Returns the number
    of blocks. `backend` other than inductor is for tests (compiles the same graphs, no code)."""
    blocks = repeated_blocks(denoiser)
    if not blocks:
        raise OptimizationUnavailable(
            "compile", f"{type(denoiser).__name__} has no repeated blocks to compile"
        )
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT
    )
    # dynamic=None (torch's default): a block is first compiled for its exact shape, and for
    # a dimension seen to change (the batch, then the image size), once more with that
    # dimension symbolic. Warming up batch 1 and the largest batch thus also covers every
    # batch in between, which batching produces at random; dynamic=False would compile each.
    for block in blocks:
        block.compile(mode=config.mode, backend=backend)
    logger.info("compiling %d blocks of the %s", len(blocks), type(denoiser).__name__)
    return len(blocks)


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters hold, counting what a quantized tensor stores (its int8
    data and scales), not the float size it stands for."""
    return sum(_tensor_bytes(parameter) for parameter in module.parameters())


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass: torchao's are
        inner, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in inner)
    return tensor.numel() * tensor.element_size()
