"""Turning one rank's denoiser into its part of a context-parallel group.

Every rank holds the whole denoiser and gets the whole of each forward's inputs
(`lockstep.py`); diffusers' context-parallel hooks then split the sequence between the ranks
of a context group, exchange it inside attention (Ulysses: all-to-all over heads; ring: the
keys and values passed round), and gather the output, so every rank ends with the whole
result. CFG-parallel (`cfg_split.py`) splits the batch across context groups.

The ranks form one device mesh of three dimensions, ("cfg", "ring", "ulysses"); diffusers'
context parallelism takes the ring and Ulysses dimensions of it, each rank's within its own
CFG half. Its plans (which inputs to split, which output to gather) come from diffusers for
the families that have one (FLUX, ...); SD3's transformer has none, so `SD3_PLAN` is ours.

Two workarounds for diffusers 0.42 on CPU, both at start, while nothing else runs:
`ModelMixin._resolve_parallel_config` picks the rank's device as
`rank % torch.accelerator.device_count()`, which is 0 on a CPU build (ZeroDivisionError), so
the device count reads 1 for the call; ring attention on CPU needs `attention.py`'s op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch
from diffusers import ContextParallelConfig
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

from deployments.generator.parallel.attention import (
    RING_BACKEND,
    cpu_ring_attention,
    use_dispatched_joint_attention,
)

MESH_DIMENSIONS = ("cfg", "ring", "ulysses")

# SD3's transformer: its patch embedding's output (the image tokens, with their positions
# added) and its prompt embedding's output are split along the sequence; the last
# projection's output (before the patches are folded back into a latent) is gathered.
SD3_PLAN = {
    "pos_embed": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
    "context_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}

# Plans of ours, by the denoiser's class name, for families diffusers has none for.
OWN_PLANS = {"SD3Transformer2DModel": SD3_PLAN}

# The denoisers whose split images the tests compare with one device's (both splits, and
# CFG-parallel). Others may have a diffusers plan, but an attention processor that calls
# SDPA itself is silently wrong when split (SD3's was), and the CFG split must know which
# inputs are batched: each family is let in once a test compares it.
VERIFIED = frozenset({"SD3Transformer2DModel", "FluxTransformer2DModel"})


@dataclass(frozen=True)
class Degrees:
    """How a replica's ranks divide the work: `cfg` halves of the batch (1 or 2), and within
    each, `ring` x `ulysses` ranks over the sequence."""

    cfg: int = 1
    ring: int = 1
    ulysses: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def context(self) -> int:
        return self.ring * self.ulysses


class ParallelUnavailable(RuntimeError):
    """The model cannot run at the configured degrees; raised at the replica's start, naming
    the key of `models[].parallel` to change."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"parallel.{key}: {reason}")
        self.key = key


def device_mesh(degrees: Degrees, device: torch.device):
    """The group's mesh; every rank calls this at once (it creates the process groups)."""
    shape = (degrees.cfg, degrees.ring, degrees.ulysses)
    return torch.distributed.device_mesh.init_device_mesh(
        device.type, mesh_shape=shape, mesh_dim_names=MESH_DIMENSIONS
    )


def check_degrees(denoiser: torch.nn.Module, degrees: Degrees) -> None:
    """Refuse degrees the denoiser cannot split: Ulysses gives each rank a share of the heads;
    and families no test has compared split and whole."""
    if type(denoiser).__name__ not in VERIFIED:
        key = "cfg_parallel" if degrees.context == 1 else _context_key(degrees)
        raise ParallelUnavailable(
            key,
            f"{type(denoiser).__name__} is not verified with parallel replicas yet "
            f"(verified: {', '.join(sorted(VERIFIED))})",
        )
    heads = getattr(denoiser.config, "num_attention_heads", None)
    if degrees.ulysses > 1 and (heads is None or heads % degrees.ulysses):
        raise ParallelUnavailable(
            "ulysses_degree",
            f"{degrees.ulysses} does not divide the {heads} attention heads of "
            f"{type(denoiser).__name__}",
        )


def _context_key(degrees: Degrees) -> str:
    return "ulysses_degree" if degrees.ulysses > 1 else "ring_degree"


def _plan_of(denoiser: torch.nn.Module) -> dict | None:
    return OWN_PLANS.get(type(denoiser).__name__) or getattr(denoiser, "_cp_plan", None)


def enable_context_parallel(denoiser: torch.nn.Module, degrees: Degrees, mesh) -> None:
    """Split `denoiser`'s attention over the mesh's ring and Ulysses dimensions (nothing to do
    when both are 1). Every rank calls this once, before its first forward."""
    if degrees.context == 1:
        return
    use_dispatched_joint_attention(denoiser)
    if degrees.ring > 1:
        cpu_ring_attention()
        if _backend_of(denoiser) in (None, "native"):
            denoiser.set_attention_backend(RING_BACKEND.value)
    # The "anything" variants split a sequence the degree does not divide (SD3's prompt is
    # 77 + 256 tokens); each is for one kind of context parallelism alone.
    config = ContextParallelConfig(
        ring_degree=degrees.ring,
        ulysses_degree=degrees.ulysses,
        ulysses_anything=degrees.ulysses > 1 and degrees.ring == 1,
        ring_anything=degrees.ring > 1 and degrees.ulysses == 1,
        mesh=mesh,
    )
    with _device_count_at_least_one():
        denoiser.enable_parallelism(config=config, cp_plan=_plan_of(denoiser))


def _backend_of(denoiser: torch.nn.Module) -> str | None:
    for module in denoiser.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if backend is not None:
            return str(getattr(backend, "value", backend))
    return None


@contextlib.contextmanager
def _device_count_at_least_one() -> Iterator[None]:
    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield
