"""LoRA adapters chosen per image within one forward: a batch whose images each use their own
adapters at their own scales (mixed-adapter batches).

peft's LoRA layers hold every loaded adapter; which ones a forward applies, and at what
scale, is layer state (`set_adapters`) that every call on the shared modules reads (design
note 9), so the request-level engine runs one adapter set at a time behind the adapter gate.
peft's own mixed batches (`adapter_names=`) pick one adapter per sample at its configured
scale: not composed sets, not per-request scales. So each LoRA layer of the denoiser gets a
forward of ours that, in a thread that has set a routing (`routed`), computes the base layer
and adds, for each adapter some rows use, its low-rank update on those rows times each row's
own scale: `base(x) + sum_a scale[row, a] * B_a(A_a(x)) * alpha_a / r_a`, peft's own
arithmetic (`lora.Linear.forward` with `scaling = weight * alpha / r`) row by row. A
composed set (several adapters on one image) is the sum of its adapters' updates, as peft
sums active adapters; nothing is merged into the weights, so nothing is shared.

In every other thread, and in this one outside `routed`, the layer runs peft's forward,
unchanged: the request-level engine's calls see no difference. The routing is thread-local
state, like the cache hooks' per-call state (`cache_hooks.py`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from deployments.jobs import AdapterWeight

_ATTRIBUTE = "_mixed_batch_original_forward"


class _Routing(threading.local):
    # For each adapter that some rows use: (row indices, each row's scale as a column).
    by_adapter: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    rows: int = 0


_ROUTING = _Routing()


class MixedAdaptersUnsupported(ValueError):
    """The denoiser's LoRA layers are of a kind the per-row forward does not compute."""


@contextlib.contextmanager
def routed(rows: Sequence[tuple[AdapterWeight, ...]], device: torch.device) -> Iterator[None]:
    """Within the block, in this thread, row i of every LoRA layer's input gets the adapters
    `rows[i]` at their scales (() is the base model)."""
    by_adapter: dict[str, tuple[list[int], list[float]]] = {}
    for row, adapters in enumerate(rows):
        for adapter_id, scale in adapters:
            indices, scales = by_adapter.setdefault(adapter_id, ([], []))
            indices.append(row)
            scales.append(float(scale))
    _ROUTING.by_adapter = {
        adapter_id: (
            torch.tensor(indices, device=device),
            torch.tensor(scales, device=device, dtype=torch.float32),
        )
        for adapter_id, (indices, scales) in by_adapter.items()
    }
    _ROUTING.rows = len(rows)
    try:
        yield
    finally:
        _ROUTING.by_adapter = None


def install(denoiser: torch.nn.Module) -> int:
    """Give every LoRA layer of `denoiser` the routed forward (those that have it keep it);
    how many layers got it now. Call it where no forward runs (after each adapter load)."""
    from peft.tuners.lora import LoraLayer

    installed = 0
    for module in denoiser.modules():
        if not isinstance(module, LoraLayer) or hasattr(module, _ATTRIBUTE):
            continue
        if any(getattr(module, "use_dora", {}).values()):
            raise MixedAdaptersUnsupported("DoRA adapters are not computed per row")
        original = module.forward
        object.__setattr__(module, _ATTRIBUTE, original)
        module.forward = _routed_forward(module, original)
        installed += 1
    return installed


def _routed_forward(layer: Any, original: Any) -> Any:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = _ROUTING.by_adapter
        if routing is None:
            return original(x, *args, **kwargs)
        if x.shape[0] != _ROUTING.rows:
            raise RuntimeError(
                f"a LoRA layer got {x.shape[0]} rows where the routing has {_ROUTING.rows}"
            )
        result = layer.base_layer(x, *args, **kwargs)
        for adapter_id, (indices, scales) in routing.items():
            if adapter_id not in layer.lora_A:
                continue  # the adapter does not touch this layer
            down = layer.lora_A[adapter_id]
            sub = x.index_select(0, indices).to(down.weight.dtype)
            update = layer.lora_B[adapter_id](down(layer.lora_dropout[adapter_id](sub)))
            # In float32, as peft multiplies by a Python float: a bfloat16 scale would be off.
            weight = (scales * _unit_scale(layer, adapter_id)).view(-1, *([1] * (update.ndim - 1)))
            result = result.index_add(0, indices, (update * weight).to(result.dtype))
        return result

    return forward


def _unit_scale(layer: Any, adapter_id: str) -> float:
    """The adapter's scale at weight 1, as peft's `set_scale` computes it (`scaling` itself
    holds the weight that the request-level engine's `set_adapters` gave it last)."""
    rank = layer.r[adapter_id]
    if layer.use_rslora.get(adapter_id, False):
        return layer.lora_alpha[adapter_id] / math.sqrt(rank)
    return layer.lora_alpha[adapter_id] / rank
