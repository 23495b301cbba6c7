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

Few small adapters (float32, ranks summing to at most `_STACKED_RANKS`), as on a CPU, run
stacked: one down-projection by every adapter's A at once, each row's columns weighted by its
scales (zero for adapters it does not use), one up-projection by the B's side by side. Four
adapters cost two matrix products a layer instead of four of each and four gathers and
scatters: on a small model the adapters' cost is those calls' overhead. Other dtypes keep
one pass per adapter, with the scale applied in float32 after it, as peft does (a bfloat16
scale would be off).

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
_STACK = "_mixed_batch_stack"  # a layer's stacked adapter weights (`_Stack`)
_STACKED_RANKS = 128


class _Routing(threading.local):
    # For each adapter that some rows use: (row indices, each row's scale as a column).
    by_adapter: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    rows: int = 0
    # Each row's scale of each adapter (rows x adapters, in `by_adapter`'s order; 0: unused),
    # and its columns for a layer that has only some of the adapters (by their positions).
    dense: torch.Tensor | None = None
    columns: dict[tuple[int, ...], torch.Tensor] | None = None
    # What `routed` was given: each row's adapters, and their device.
    spec: list[tuple[AdapterWeight, ...]] | None = None
    device: torch.device | None = None

    _FIELDS = ("by_adapter", "rows", "dense", "columns", "spec", "device")

    def saved(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def restore(self, saved: tuple[Any, ...]) -> None:
        for name, value in zip(self._FIELDS, saved, strict=True):
            setattr(self, name, value)


_ROUTING = _Routing()


class MixedAdaptersUnsupported(ValueError):
    """The denoiser's LoRA layers are of a kind the per-row forward does not compute."""


@contextlib.contextmanager
def routed(rows: Sequence[tuple[AdapterWeight, ...]], device: torch.device) -> Iterator[None]:
    """Within the block, in this thread, row i of every LoRA layer's input gets the adapters
    `rows[i]` at their scales (() is the base model). Nested, the inner routing holds
    within its block and the outer one again after it."""
    outer = _ROUTING.saved()
    _route(list(rows), device)
    try:
        yield
    finally:
        _ROUTING.restore(outer)


@contextlib.contextmanager
def narrowed(indices: Sequence[int]) -> Iterator[None]:
    """Within the block, the forwards run only the routed rows at `indices` (a per-image
    cache skipping the others, `loop/caches/`): the routing keeps those rows'
    adapters. Nothing to do where no routing holds."""
    spec, device = _ROUTING.spec, _ROUTING.device
    if spec is None or device is None:
        yield
        return
    with routed([spec[index] for index in indices], device):
        yield


def _route(rows: list[tuple[AdapterWeight, ...]], device: torch.device) -> None:
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
    dense = torch.zeros(len(rows), len(by_adapter), dtype=torch.float32)
    for column, (indices, scales) in enumerate(by_adapter.values()):
        dense[indices, column] = torch.tensor(scales)
    _ROUTING.dense = dense.to(device)
    _ROUTING.columns = {}
    _ROUTING.spec, _ROUTING.device = rows, device


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
        # The routing's adapters that touch this layer, with their columns in the routing.
        used = [(column, a) for column, a in enumerate(routing) if a in layer.lora_A]
        stack = _stack(layer, [adapter_id for _, adapter_id in used]) if used else None
        if stack is not None:
            return result + stack.update(x, _row_scales([p for p, _ in used])).to(result.dtype)
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


def _row_scales(positions: list[int]) -> torch.Tensor:
    """Each row's scale of the adapters at `positions` of the routing (rows x adapters)."""
    dense = _ROUTING.dense
    if len(positions) == dense.shape[1]:
        return dense
    key = tuple(positions)
    if key not in _ROUTING.columns:
        _ROUTING.columns[key] = torch.tensor(positions, device=dense.device)
    return dense.index_select(1, _ROUTING.columns[key])


class _Stack:
    """A layer's adapters side by side: their A's stacked (sum of ranks x in), their B's
    (out x sum of ranks), and the map from each adapter's scale to its rank's columns,
    times its scale at weight 1 (adapters x sum of ranks)."""

    def __init__(self, layer: Any, adapter_ids: list[str]) -> None:
        # The modules themselves, held: a reloaded adapter is new modules, never the old
        # ones' ids again while this holds them.
        self.modules = [(layer.lora_A[a], layer.lora_B[a]) for a in adapter_ids]
        self.down = torch.cat([down.weight for down, _ in self.modules], dim=0)
        self.up = torch.cat([up.weight for _, up in self.modules], dim=1)
        ranks = [down.weight.shape[0] for down, _ in self.modules]
        spread = torch.zeros(len(ranks), sum(ranks), dtype=torch.float32)
        start = 0
        for index, (adapter_id, rank) in enumerate(zip(adapter_ids, ranks, strict=True)):
            spread[index, start : start + rank] = _unit_scale(layer, adapter_id)
            start += rank
        self.spread = spread.to(self.down.device)

    def holds(self, layer: Any, adapter_ids: list[str]) -> bool:
        return len(adapter_ids) == len(self.modules) and all(
            layer.lora_A[a] is down and layer.lora_B[a] is up
            for a, (down, up) in zip(adapter_ids, self.modules, strict=True)
        )

    def update(self, x: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
        """Every row's sum of its adapters' updates, each at its scale."""
        weights = row_scales @ self.spread  # rows x sum of ranks
        hidden = torch.nn.functional.linear(x.to(self.down.dtype), self.down)
        hidden = hidden * weights.view(weights.shape[0], *([1] * (hidden.ndim - 2)), -1)
        return torch.nn.functional.linear(hidden, self.up)


def _stack(layer: Any, adapter_ids: list[str]) -> _Stack | None:
    """The layer's stacked adapters, made anew when its adapters changed; None where they
    run one by one (not float32 linear layers, a bias, dropout in training, large ranks)."""
    stack = getattr(layer, _STACK, None)
    if stack is not None and stack.holds(layer, adapter_ids):
        return stack
    pairs = [(layer.lora_A[a], layer.lora_B[a]) for a in adapter_ids]
    stackable = all(
        isinstance(down, torch.nn.Linear)
        and isinstance(up, torch.nn.Linear)
        and down.bias is None
        and up.bias is None
        and down.weight.dtype == torch.float32
        and not (isinstance(layer.lora_dropout[a], torch.nn.Dropout) and layer.training)
        for a, (down, up) in zip(adapter_ids, pairs, strict=True)
    )
    if not stackable or sum(down.weight.shape[0] for down, _ in pairs) > _STACKED_RANKS:
        return None
    stack = _Stack(layer, adapter_ids)
    object.__setattr__(layer, _STACK, stack)
    return stack
