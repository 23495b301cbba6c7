"""diffusers' cache hooks on a replica's shared denoiser, with each pipeline call's own state.

A model's `optimizations.cache` (`deployments/config/optimizations_config.py`) turns on one of
diffusers' caches, which skip denoiser work between similar steps: First-Block-Cache and
MagCache skip whole blocks (reusing the residual of the last computed step), TaylorSeer
predicts attention outputs from a Taylor series, Pyramid Attention Broadcast reuses attention
outputs. `apply_cache` hooks them into the shared denoiser once, at the replica's start; a
kind that cannot work on the model's denoiser (no blocks diffusers knows, no module its
patterns match, bad options) fails the start there, naming `optimizations.cache.kind` and
the denoiser's class, never a request (one call with the cache on runs at the start to
catch the kinds that hook in but fail when they run). YAML cannot spell two options: a
TaylorSeer `taylor_factors_dtype` is a name (`float32`), and MagCache's `mag_ratios: flux`
means diffusers' FLUX ratios, fitted to `num_inference_steps` (the model's `default_steps`
unless the options say).

Why per-call state, and how. Each hook keeps what it caches (the last step's residuals, the
Taylor factors, a step counter, the last attention output) inside the hook objects on the
SHARED denoiser, and diffusers resets it when a pipeline call ends. A replica runs several
calls at once on that one denoiser (`deployments/generator/calls/call_runner.py`): unchanged, call A
would skip on B's residuals, advance B's step counter and reset B's state in the middle of
B's run (design note 9). Two fixes were possible: serialize cached calls (one
at a time per replica, state reset at each start), or give each call its own state. A call
runs from start to end in one worker thread, and a thread runs one call at a time, so
per-call state is just per-thread state bracketed by the call: `apply_cache` swaps each
hook's state holder (diffusers' `StateManager`, PAB's state object) for one that looks its
state up in a thread-local slot, and `call_scope` (wrapped around every pipeline call by the
call runner) gives the slot a fresh dict at the call's start and drops it at its end. That keeps
the replica's concurrency (serializing would give back much of what the cache saves: on a
GPU the concurrent calls' text encoding, VAE decoding and Python overhead overlap the
denoiser's kernels), costs no lock, and leaves the hooks' own code untouched. The price is
memory: each running call holds its own cached tensors (for TaylorSeer, factors of every
hooked attention output), as diffusers' single-call design would per call. A thread running
the denoiser outside `call_scope` (a warm-up) gets state that lives until its next call.

What a batch shares. One pipeline call over several images runs the hooks on the whole batch
tensor: First-Block-Cache decides to skip from the batch's mean change, so an image's result
depends on its batch companions (a batch rerun gives the same images). TaylorSeer, MagCache
and PAB decide from the step (and MagCache's fixed ratios) alone and cache element-wise, so
their images do not depend on the batch. The cache is per model, so every call of a replica
has the same setting: the batching key needs no cache field.

In the continuous loop, First-Block-Cache and TaylorSeer decide per image instead, each
image with its own state at its own step: hooks of `loop/caches/`, installed here outside
diffusers' on the same modules, take the loop's forwards and hand every other call to
diffusers' hooks unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks.hooks import CacheContext, ModelHook, StateManager
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
from diffusers.hooks.pyramid_attention_broadcast import (
    PyramidAttentionBroadcastHook,
    PyramidAttentionBroadcastState,
)

from deployments.config.model_config import ModelConfig
from deployments.config.optimizations_config import CacheConfig
from deployments.generator.loop import caches as per_image
from deployments.generator.model.components import DTYPES, denoiser_of, find_denoiser
from deployments.generator.model.pipelines import RequestPipelines

logger = logging.getLogger("ray.serve")

_CONFIGS: dict[str, tuple[type, Callable[[torch.nn.Module, Any], None]]] = {
    "first_block": (FirstBlockCacheConfig, apply_first_block_cache),
    "taylorseer": (TaylorSeerCacheConfig, apply_taylorseer_cache),
    "magcache": (MagCacheConfig, apply_mag_cache),
    "pyramid_attention_broadcast": (
        PyramidAttentionBroadcastConfig,
        apply_pyramid_attention_broadcast,
    ),
}
_CACHE_HOOK_MODULES = {
    f"diffusers.hooks.{name}"
    for name in (
        "first_block_cache",
        "taylorseer_cache",
        "mag_cache",
        "pyramid_attention_broadcast",
    )
}
_TAKES_THRESHOLD = ("first_block", "magcache")
# Where the per-call slots of a cached denoiser live (an attribute of the shared module).
_PER_CALL_ATTRIBUTE = "_image_service_per_call_cache"


class CacheUnsupported(ValueError):
    """`optimizations.cache` cannot work on this model: the replica must not start."""


class _PerCall(threading.local):
    """The running call's cache state, one slot per state holder (by `id`). Thread-local:
    a call runs in one worker thread, and a thread runs one call at a time."""

    states: dict[int, Any] | None = None
    scheduler: Any = None

    def slot(self, owner: object, make: Callable[[], Any]) -> Any:
        if self.states is None:  # outside `call_scope`: kept until this thread's next call
            self.states = {}
        if id(owner) not in self.states:
            self.states[id(owner)] = make()
        return self.states[id(owner)]

    def timestep(self) -> float:
        """The running call's current timestep (0-1000), read from its own scheduler: PAB
        skips only inside a range of timesteps, and SD3's pipeline does not report one."""
        scheduler = self.scheduler
        if scheduler is None:
            return 0.0
        index = getattr(scheduler, "step_index", None)
        if index is None:  # before the first step
            index = getattr(scheduler, "begin_index", None) or 0
        return float(scheduler.timesteps[min(index, len(scheduler.timesteps) - 1)])


class _PerCallStateManager(StateManager):
    """A diffusers `StateManager` whose states and cache context belong to the running call.

    `super().__init__` is not called: the two attributes it would set are per call here."""

    def __init__(self, shared: StateManager, per_call: _PerCall) -> None:
        self._state_cls = shared._state_cls
        self._init_args = shared._init_args
        self._init_kwargs = shared._init_kwargs
        self._per_call = per_call

    def _slot(self) -> dict[str, Any]:
        return self._per_call.slot(self, lambda: {"states": {}, "context": None})

    @property
    def _state_cache(self) -> dict[str, Any]:
        return self._slot()["states"]

    @property
    def _context(self) -> CacheContext | None:
        return self._slot()["context"]

    @_context.setter
    def _context(self, context: CacheContext | None) -> None:
        self._slot()["context"] = context

    @property
    def context(self) -> CacheContext:
        # SD3's and SDXL's pipelines never enter `cache_context`; their one denoiser call
        # per step is the whole context (as MagCache's own hooks assume).
        return self._context or CacheContext(name="inference")


class _PerCallObject:
    """Stands in for a hook's own state object (PAB's): each call gets a fresh one."""

    def __init__(self, make: Callable[[], Any], per_call: _PerCall) -> None:
        object.__setattr__(self, "_make", make)
        object.__setattr__(self, "_per_call", per_call)

    def _own(self) -> Any:
        return self._per_call.slot(self, self._make)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._own(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._own(), name, value)


def apply_cache(pipeline: DiffusionPipeline, model: ModelConfig) -> None:
    """Hook the model's `optimizations.cache` into its shared pipeline's denoiser, with
    per-call state (see the module's docstring), and run one call at the model's default
    size and steps to prove it works. Call it once, before any request runs.

    Raises CacheUnsupported, naming `optimizations.cache.kind` and the denoiser's class,
    when the kind cannot work on this denoiser."""
    config = model.optimizations.cache
    if config is None:
        return
    denoiser = denoiser_of(pipeline)
    where = f"optimizations.cache.kind={config.kind!r} on {type(denoiser).__name__}"
    per_call = _PerCall()
    try:
        diffusers_config = _diffusers_config(config, per_call, model.default_steps)
        enable = getattr(denoiser, "enable_cache", None)
        if enable is not None:
            enable(diffusers_config)
        else:  # SD3's transformer and the UNet lack diffusers' CacheMixin
            _CONFIGS[config.kind][1](denoiser, diffusers_config)
            HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()
        per_image.install(denoiser, config.kind, diffusers_config)  # the loop's side
    except (ValueError, TypeError, IndexError, KeyError) as error:
        raise CacheUnsupported(f"{where}: {type(error).__name__}: {error}") from error
    if _make_state_per_call(denoiser, per_call, where) == 0:
        raise CacheUnsupported(
            f"{where}: no module of this denoiser matched the cache (diffusers knows none of "
            "its blocks or attention layers by the names this kind looks for)"
        )
    setattr(denoiser, _PER_CALL_ATTRIBUTE, per_call)
    _check_call(pipeline, model, where)


def _check_call(pipeline: DiffusionPipeline, model: ModelConfig, where: str) -> None:
    """One call with the cache on, so that a kind that hooks in but fails when it runs
    fails the start (First-Block-Cache on SD3: the last JointTransformerBlock returns no
    text stream, and diffusers 0.42.1 subtracts from it)."""
    width, _, height = model.default_size.partition("x")
    view = RequestPipelines(pipeline).view()
    started = time.perf_counter()
    try:
        with call_scope(view):
            view(
                prompt="a check of the cache",
                width=int(width),
                height=int(height),
                num_inference_steps=model.default_steps,
                generator=torch.Generator(pipeline.device).manual_seed(0),
                output_type="latent",
            )
    except Exception as error:
        raise CacheUnsupported(
            f"{where}: a {model.default_size} call with it failed: {type(error).__name__}: {error}"
        ) from error
    logger.info("%s: checked in %.2f s", where, time.perf_counter() - started)


def _diffusers_config(config: CacheConfig, per_call: _PerCall, default_steps: int) -> Any:
    """The diffusers config object of `config`: its options as keyword arguments, with the
    values YAML cannot spell (dtypes, FLUX's MagCache ratios) translated."""
    options = dict(config.options)
    if config.threshold is not None:
        if config.kind not in _TAKES_THRESHOLD:
            raise ValueError(
                f"optimizations.cache.threshold does not apply to kind {config.kind!r}; "
                f"only to {', '.join(_TAKES_THRESHOLD)} (see `options`)"
            )
        options["threshold"] = config.threshold
    if config.kind == "taylorseer" and isinstance(options.get("taylor_factors_dtype"), str):
        options["taylor_factors_dtype"] = DTYPES[options["taylor_factors_dtype"]]
    if config.kind == "magcache":
        options.setdefault("num_inference_steps", default_steps)
        if options.get("mag_ratios") == "flux":
            options["mag_ratios"] = FLUX_MAG_RATIOS
    if config.kind == "pyramid_attention_broadcast":
        # The running call's timestep, not one pipeline's: each call has its own.
        options["current_timestep_callback"] = per_call.timestep
    config_class = _CONFIGS[config.kind][0]
    return config_class(**options)


def _make_state_per_call(denoiser: torch.nn.Module, per_call: _PerCall, where: str) -> int:
    """Swap every cache hook's state holder for a per-call one; the number of cache hooks
    (those of other optimizations, layerwise casting say, are left alone)."""
    hooks = 0
    per_call_managers: dict[int, _PerCallStateManager] = {}
    for _, module in denoiser.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in registry.hooks.values() if registry is not None else ():
            if type(hook).__module__ not in _CACHE_HOOK_MODULES:
                continue
            hooks += 1
            if not _swap_state(hook, per_call, per_call_managers):
                raise CacheUnsupported(
                    f"{where}: {type(hook).__name__} keeps state this service cannot give "
                    "each call (a diffusers version it was not written for?)"
                )
    return hooks


def _swap_state(
    hook: ModelHook, per_call: _PerCall, managers: dict[int, _PerCallStateManager]
) -> bool:
    """Make `hook`'s state per call; False if it keeps state in a way not known here.
    Hooks that share a StateManager (a block cache's head and tail) share its stand-in."""
    swapped = False
    for name, value in list(vars(hook).items()):
        if isinstance(value, StateManager):
            if id(value) not in managers:
                managers[id(value)] = _PerCallStateManager(value, per_call)
            setattr(hook, name, managers[id(value)])
            swapped = True
    if isinstance(hook, PyramidAttentionBroadcastHook):
        hook.state = _PerCallObject(PyramidAttentionBroadcastState, per_call)
        swapped = True
    return swapped or not hook._is_stateful


@contextlib.contextmanager
def call_scope(view: DiffusionPipeline) -> Iterator[None]:
    """Run one pipeline call (on `view`, in this thread) with its own fresh cache state,
    dropped at the end; nothing to do where the denoiser has no cache."""
    per_call: _PerCall | None = getattr(find_denoiser(view), _PER_CALL_ATTRIBUTE, None)
    if per_call is None:
        yield
        return
    per_call.states, per_call.scheduler = {}, view.scheduler
    try:
        yield
    finally:
        per_call.states, per_call.scheduler = None, None
