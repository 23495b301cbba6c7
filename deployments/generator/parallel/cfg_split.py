"""CFG-parallel: each half of a forward's batch on its own ranks.

A model with classifier-free guidance runs its unconditional and conditional rows in one
batch (SD3: `[negative..., positive...]`), so splitting every batched input in two along the
batch puts the two halves on two ranks (or two context groups); the outputs are gathered
back in order and every rank ends with the whole batch. Any even batch splits the same way
(a batch of guidance-distilled FLUX images is split between the ranks by image); an odd one
runs whole on every rank, which is correct and merely not faster.

What is batched: every tensor argument whose first dimension is the batch size
(`hidden_states`'s), except the inputs that are positions of tokens and have no batch
dimension (FLUX's `img_ids` and `txt_ids`, whose first dimension is the sequence).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# Denoiser inputs that are per token, not per image: never split along the batch.
UNBATCHED_INPUTS = frozenset({"img_ids", "txt_ids"})


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    first = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        return None
    return first.shape[0]


def _half(value: Any, batch: int, part: int, parts: int) -> Any:
    """`value` with every batched tensor cut to its `part`-th of `parts` along the batch."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.chunk(parts)[part]
        return value
    if isinstance(value, dict):
        return {
            key: item if key in UNBATCHED_INPUTS else _half(item, batch, part, parts)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(_half(item, batch, part, parts) for item in value)
    return value


def _gathered(value: Any, rows: int, group, parts: int) -> Any:
    """`value` with every tensor of `rows` rows gathered from the group's ranks, in order."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != rows:
            return value
        pieces = [torch.empty_like(value) for _ in range(parts)]
        dist.all_gather(pieces, value.contiguous(), group=group)
        return torch.cat(pieces)
    if isinstance(value, dict):  # diffusers' `Transformer2DModelOutput` is an OrderedDict
        gathered = {key: _gathered(item, rows, group, parts) for key, item in value.items()}
        return type(value)(**gathered)
    if isinstance(value, list | tuple):
        return type(value)(_gathered(item, rows, group, parts) for item in value)
    return value


def split_batches(denoiser: torch.nn.Module, mesh) -> None:
    """Make `denoiser`'s forward run this rank's half of each even batch and gather the
    whole output from the mesh's "cfg" dimension. Every rank calls this once, after
    context parallelism is on (its hooks then see the half)."""
    group = mesh["cfg"].get_group()
    parts = dist.get_world_size(group)
    part = dist.get_rank(group)
    if parts == 1:
        return
    forward: Callable[..., Any] = denoiser.forward

    @functools.wraps(forward)
    def halved(*args: Any, **kwargs: Any) -> Any:
        batch = _batch_size(args, kwargs)
        if batch is None or batch % parts:
            return forward(*args, **kwargs)
        output = forward(*_half(args, batch, part, parts), **_half(kwargs, batch, part, parts))
        return _gathered(output, batch // parts, group, parts)

    denoiser.forward = halved
