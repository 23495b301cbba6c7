"""Shared modules stay as loaded: no pipeline call changes a shared module's dtype or device.

Every view of a replica's pipeline runs on the same module objects, so anything one call
changes on them, every concurrent call sees (design note 9). diffusers' SDXL pipelines do
that to the VAE when its config says `force_upcast` (the stock SDXL VAE overflows in
float16): image-to-image and inpainting call `self.vae.to(torch.float32)` before encoding and
`self.vae.to(dtype)` after, and float16 text-to-image does the same around its decode, all
inside the call. A concurrent call on another view then meets the VAE in the other dtype
(`Input type (c10::BFloat16) and bias type (float) should be the same`), and every flip
copies the weights to new storage.

So, once, before any view exists, such a VAE is put where those pipelines want it for good:
- it is cast to float32 (the dtype `force_upcast` asks for);
- its `to()` ignores dtype changes, so the per-call flips become no-ops, and refuses to move
  it to another device (that would move it under every concurrent call);
- its `encode` and `decode` cast their input to float32, since a pipeline hands them images
  or latents in its own dtype. Their outputs stay float32: the SDXL pipelines cast encoded
  latents to their dtype themselves, and post-process decoded images in float32.
Families whose pipelines never read `force_upcast` (SD3, FLUX) keep their VAE as loaded: they
never move it, and a float32 VAE would cost them memory and time for nothing.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

logger = logging.getLogger("ray.serve")

# Set on a VAE once it is pinned, so pinning twice (at load, then by RequestPipelines) is a
# no-op.
_PINNED = "_image_service_pinned"


def pin_upcast_vae(pipeline: Any, pipeline_classes: Iterable[type]) -> bool:
    """Keep `pipeline`'s VAE in float32 and immune to per-call `.to()` if its config asks for
    float32 (`force_upcast`) and one of `pipeline_classes` (the family's pipelines for each
    task) would otherwise flip it inside a call. Returns whether the VAE is pinned.

    Must run before any call uses the pipeline: it casts a shared module once."""
    vae = getattr(pipeline, "vae", None)
    if not isinstance(vae, torch.nn.Module):
        return False
    if getattr(vae, _PINNED, False):
        return True
    if not getattr(vae.config, "force_upcast", False):
        return False
    if not any(_flips_vae(cls) for cls in pipeline_classes):
        return False
    if any(p.dtype != torch.float32 for p in vae.parameters()):
        logger.info("keeping the VAE in float32: its config says force_upcast")
        # nn.Module's own `to`: diffusers' warns about casting after loading, which is the point.
        torch.nn.Module.to(vae, dtype=torch.float32)
    device = next(vae.parameters()).device
    # Instance attributes shadow the methods, for the pipelines' `self.vae.to(...)` and
    # `self.vae.encode(...)` alike.
    vae.to = functools.partial(_stay, vae, device)
    vae.encode = _input_as(torch.float32, vae.encode)
    vae.decode = _input_as(torch.float32, vae.decode)
    setattr(vae, _PINNED, True)
    return True


@functools.cache
def _flips_vae(pipeline_class: type) -> bool:
    """Whether the class's code reads `force_upcast`: the diffusers pipelines that do are those
    that move the VAE to float32 and back inside a call."""
    try:
        return "force_upcast" in inspect.getsource(pipeline_class)
    except (OSError, TypeError):
        return True  # cannot tell: pinning is safe, only a little slower


def _stay(module: torch.nn.Module, pinned: torch.device, /, *args: Any, **kwargs: Any):
    """`module.to(...)` for a pinned module: dtype changes are ignored (the pipelines' flips),
    a move to another device is an error, and the module is returned as `to` would."""
    target, _dtype, _non_blocking, _memory_format = torch._C._nn._parse_to(*args, **kwargs)
    if target is not None and not _same_device(target, pinned):
        raise RuntimeError(
            f"the shared VAE stays on {pinned}: moving it to {target} would move it under "
            "every concurrent call"
        )
    return module


def _same_device(target: torch.device, device: torch.device) -> bool:
    return target.type == device.type and target.index in (None, device.index)


def _input_as(dtype: torch.dtype, method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` (a VAE's `encode(x, ...)` or `decode(z, ...)`) with its tensor input in
    `dtype`."""

    @functools.wraps(method)
    def cast(sample: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(sample, torch.Tensor) and sample.is_floating_point():
            sample = sample.to(dtype)
        return method(sample, *args, **kwargs)

    return cast
