"""TaylorSeer per image in the loop: each image's hooked modules compute or predict at its
own step, from its own Taylor factors.

diffusers' TaylorSeer hooks attention modules (or, in its lite mode, skips whole blocks and
predicts the output projection): at a step that computes, the module runs and its output
updates Taylor factors (the output and its finite differences over the steps between
updates); at the steps between, the output is the Taylor series' value at the step, and
the module does not run. The decision is the step's alone (warm-up steps, then one step of
every `cache_interval`), counted per call. Here each image keeps diffusers' own
`TaylorSeerState` for each hooked module (in its `ImageState.caches`), counting its own
steps: in one forward, the images that compute run the module over their rows
(`loop_rows.Narrowing`) and update their factors, the others take their prediction, and
the output is put back together row by row. diffusers' own state class does the arithmetic,
so an image's output is the one its request alone would get, whatever shares its forward.

A hook of ours sits outside each of diffusers' TaylorSeer hooks: in a request-level call it
passes the call on; in a loop forward it goes past it to the module.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import ModelHook
from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK, TaylorSeerCacheHook

from deployments.generator.loop.caches.loop_rows import Narrowing, current

_HOOK = "image_service_per_image_taylorseer"


def install(denoiser: torch.nn.Module) -> int:
    """Hook the per-image TaylorSeer outside every module diffusers' TaylorSeer hooked (call
    it right after diffusers' `apply_taylorseer_cache`); the number of modules hooked."""
    hooked = 0
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        taylor = registry.get_hook(_TAYLORSEER_CACHE_HOOK) if registry is not None else None
        if taylor is None:
            continue
        HookRegistry.check_if_exists_or_initialize(module).register_hook(
            _ModuleHook(taylor, module), _HOOK
        )
        hooked += 1
    return hooked


class _ModuleHook(ModelHook):
    """On one hooked module: diffusers' hook in request-level calls, each image's own
    TaylorSeer state in the loop's forwards."""

    _is_stateful = False  # the state lives on the images

    def __init__(self, taylor: TaylorSeerCacheHook, module: torch.nn.Module) -> None:
        super().__init__()
        self._taylor = taylor
        self._narrowing = Narrowing(module)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = current()
        if forward is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        run = self._taylor.fn_ref.original_forward  # past diffusers' hook
        total = len(forward.rows)
        computing: list[tuple[Any, torch.Tensor]] = []
        predicting: list[tuple[Any, torch.Tensor]] = []
        indices: list[int] = []
        for caches, rows, host_rows in forward.groups(_device(args, kwargs)):
            state = caches.get(self)
            if state is None:
                state = caches[self] = self._new_state()
            forward.keep(_restorer(state))
            if self._computes(state):
                computing.append((state, rows))
                indices.extend(host_rows)
            else:
                predicting.append((state, rows))
        if not predicting:  # every image computes: the module over every row
            outputs = run(*args, **kwargs)
            self._update(computing, _as_tuple(outputs), by_rows=True)
            return outputs
        parts: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []
        single = True
        if computing:
            together = torch.cat([rows for _, rows in computing])
            outputs = self._narrowing.call(run, args, kwargs, together, indices, total)
            single = isinstance(outputs, torch.Tensor)
            parts.append((together, _as_tuple(outputs)))
            self._update(computing, _as_tuple(outputs), by_rows=False)
        for state, rows in predicting:
            predicted = tuple(state.predict())
            single = single and len(predicted) == 1
            parts.append((rows, predicted))
        return _assembled(parts, total, single)

    def _new_state(self) -> Any:
        manager = self._taylor.state_manager
        return manager._state_cls(*manager._init_args, **manager._init_kwargs)

    def _computes(self, state: Any) -> bool:
        """diffusers' decision (`TaylorSeerCacheHook._measure_should_compute`), on the
        image's own step count."""
        taylor = self._taylor
        state.current_step += 1
        step = state.current_step
        warming_up = step < taylor.disable_cache_before_step
        refreshing = (step - taylor.disable_cache_before_step - 1) % taylor.cache_interval == 0
        cooling_down = (
            taylor.disable_cache_after_step is not None and step >= taylor.disable_cache_after_step
        )
        return warming_up or refreshing or cooling_down

    @staticmethod
    def _update(
        computing: list[tuple[Any, torch.Tensor]],
        outputs: tuple[torch.Tensor, ...],
        by_rows: bool,
    ) -> None:
        """Each computing image's factors from its rows of `outputs`: at its rows of the
        whole call (`by_rows`), or in order, where `outputs` ran only the computing rows."""
        offset = 0
        for state, rows in computing:
            if by_rows:
                mine = tuple(output.index_select(0, rows) for output in outputs)
            else:
                mine = tuple(output[offset : offset + len(rows)] for output in outputs)
                offset += len(rows)
            state.update(mine)


def _assembled(
    parts: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]], total: int, single: bool
) -> Any:
    """The module's output over every row, from each part's rows."""
    _, first = parts[0]
    outputs = []
    for index, like in enumerate(first):
        whole = like.new_empty((total, *like.shape[1:]))
        for rows, values in parts:
            whole.index_copy_(0, rows, values[index].to(like.dtype))
        outputs.append(whole)
    return outputs[0] if single else tuple(outputs)


def _restorer(state: Any):
    """Puts `state` back as it is now: its step count, and its factors (an update replaces
    an output's factors, never changes them in place)."""
    saved = dict(vars(state))
    saved["taylor_factors"] = dict(state.taylor_factors)

    def restore() -> None:
        vars(state).update(saved)

    return restore


def _as_tuple(outputs: Any) -> tuple[torch.Tensor, ...]:
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


def _device(args: tuple, kwargs: dict) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    raise ValueError("a module TaylorSeer hooked was called without a tensor")
