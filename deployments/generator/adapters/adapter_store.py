"""A replica's LoRA adapters: fetched and checked off the event loop, loaded into the shared
pipeline only while no pipeline call runs, and unloaded least recently used first.

Two steps, so that the slow and fallible part never holds the replica's calls up:
- `AdapterStore.prefetch(ids)` (blocking; the deployment runs it in a thread, off the event
  loop, while generations go on) finds each adapter's weights file (building an embedded one,
  downloading a hub one into the Hugging Face cache), reads its state dict with the pipeline's
  own `lora_state_dict` and checks that every weight fits a module of the model
  (`adapter_fit.py`): diffusers would load an adapter of another model with a mere
  warning. A checked adapter is staged: its local file is remembered (not its
  tensors: loading from the file keeps what only the file carries, the adapter's saved
  `lora_alpha` and, for kohya-style files, the alphas that `lora_state_dict` returns apart,
  which a state dict passed to `load_lora_weights` would lose). A failure raises
  `AdapterUnavailable` and is remembered for `FAILURE_RETRY_S`: requests for a broken adapter
  fail fast, and a fixed file or a hub that is back is tried again after that.
- `AdapterStore.activate(adapters)` is the `AdapterGate`'s switch (`adapter_gate.py`): it runs
  with no call running and makes the shared modules right for one adapter set: loads what is
  missing (`load_lora_weights` from the staged file, read again from the page cache), unloads
  the least recently used adapters beyond `max_adapters_per_replica` (never one the set
  needs: a set larger than the limit is loaded whole), then `enable_lora` + `set_adapters`
  with the set's scales, or `disable_lora` for the base model. A load that raises deletes
  whatever it injected, so nothing of it stays.
Loaded adapters are never fused: the base weights keep their storage and values, and
`disable_lora` gives the base model's exact images.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from deployments.adapter_directory import WatchedAdapterDirectory
from deployments.config.model_config import AdapterConfig
from deployments.generator.adapters.adapter_fit import misfit
from deployments.generator.adapters.adapter_gate import AdapterGate
from deployments.generator.adapters.embedded_adapters import resolve_adapter_source
from deployments.jobs import AdapterUnavailable, AdapterWeight

logger = logging.getLogger("ray.serve")

# Seconds a failed adapter keeps failing without being fetched again.
FAILURE_RETRY_S = 30.0
# The weights file of a hub adapter configured without `weight_name`.
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoopStep:
    """The gate's key for a continuous-loop step: rows pick their own adapters, so any
    loaded adapters do (`loop_adapters.py`)."""


LOOP_STEP = LoopStep()


@dataclass(frozen=True)
class LoadForLoop:
    """The gate's key whose switch loads `ids` for the continuous loop (sets nothing),
    evicting none of `ids` nor of `keep` (what other images in flight use)."""

    ids: frozenset[str]
    keep: frozenset[str] = frozenset()


class AdapterMetrics(Protocol):
    def adapter_loaded(self, adapter_id: str, seconds: float) -> None: ...


class AdapterStore:
    """The adapters of one replica's shared `pipeline` (see the module's docstring)."""

    def __init__(
        self,
        pipeline: Any,
        adapters: Iterable[AdapterConfig],
        max_loaded: int,
        metrics: AdapterMetrics | None = None,
        directory: WatchedAdapterDirectory | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._configs = {adapter.id: adapter for adapter in adapters}
        self._directory = directory  # more adapters, found there by id
        self._max_loaded = max_loaded
        self._metrics = metrics
        self._lock = threading.Lock()  # guards the two dicts below (prefetch runs anywhere)
        # Adapter id -> its checked local weights file, and that file's `_signature` then.
        self._staged: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._failures: dict[str, tuple[AdapterUnavailable, float]] = {}
        self._on_text_encoders: dict[str, bool] = {}  # by adapter id, once fetched
        # Loaded into the pipeline, least recently used first; touched under the gate only.
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self.loads = 0
        self.load_seconds: list[float] = []  # of each load, most recent last (bounded)
        # What every pipeline call on this pipeline enters (with its adapter set): one gate
        # per pipeline, since the modules' adapter state is the pipeline's.
        self.gate = AdapterGate(self.activate)
        # Called after each load, under the gate (the continuous loop wraps new LoRA layers).
        self.after_load: list[Callable[[], None]] = []

    @property
    def loaded(self) -> list[str]:
        """The adapters in the pipeline now, least recently used first."""
        with self._lock:  # a switch may change it meanwhile
            return list(self._loaded)

    def missing(self, adapter_ids: Iterable[str]) -> list[str]:
        """The ids that are neither staged nor loaded (what `prefetch` would work on)."""
        with self._lock:
            return [i for i in adapter_ids if i not in self._staged and i not in self._loaded]

    def prefetch(self, adapter_ids: Iterable[str]) -> None:
        """Fetch and check each adapter that is not staged yet (blocking: run it in a thread).
        Raises `AdapterUnavailable` for the first that is unknown or does not fit."""
        for adapter_id in adapter_ids:
            if not self.missing([adapter_id]):
                continue
            with self._lock:
                failed = self._failures.get(adapter_id)
            if failed is not None and time.monotonic() - failed[1] < FAILURE_RETRY_S:
                # A fresh exception each time: one object raised in many threads would
                # share (and grow) one traceback.
                raise AdapterUnavailable(adapter_id, failed[0].reason)
            try:
                weights = self._fetch(adapter_id)
            except AdapterUnavailable as error:
                logger.warning("%s", error)
                if self._known(adapter_id):  # an unknown id is looked up afresh each time
                    with self._lock:
                        self._failures[adapter_id] = (error, time.monotonic())
                raise
            with self._lock:
                self._staged[adapter_id] = (weights, _signature(weights))
                self._failures.pop(adapter_id, None)

    def _known(self, adapter_id: str) -> bool:
        if adapter_id in self._configs:
            return True
        return self._directory is not None and adapter_id in self._directory.adapters()

    def _fetch(self, adapter_id: str) -> str:
        """The checked local weights file of `adapter_id`."""
        config = self._configs.get(adapter_id)
        if config is None and self._directory is not None:
            # Read now: the ingress may have seen the file since this replica last looked.
            config = self._directory.adapters(fresh=True).get(adapter_id)
        if config is None:
            raise AdapterUnavailable(adapter_id, "it is not one of this model's adapters")
        started = time.perf_counter()
        try:
            source, weight_name = resolve_adapter_source(config)
            weights = _local_weights(source, weight_name)
            state_dict = self._read(weights)
        except AdapterUnavailable:
            raise
        except Exception as error:
            # The cause goes to the log; the client's answer says what failed, no internals.
            logger.warning(
                "adapter %s: reading %s failed", adapter_id, config.source, exc_info=True
            )
            raise AdapterUnavailable(adapter_id, "its weights could not be read") from error
        reason = misfit(self._pipeline, state_dict)
        if reason is not None:
            model = type(self._pipeline).__name__
            raise AdapterUnavailable(adapter_id, f"its weights do not fit this {model}: {reason}")
        with self._lock:
            self._on_text_encoders[adapter_id] = any(
                key.startswith("text_encoder") for key in state_dict
            )
        seconds = time.perf_counter() - started
        logger.info("adapter %s staged from %s in %.3f s", adapter_id, weights, seconds)
        return weights

    def _read(self, weights: str) -> dict[str, Any]:
        extra = {}
        if hasattr(self._pipeline, "unet"):  # SDXL's reader converts kohya files by it
            extra["unet_config"] = self._pipeline.unet.config
        state = type(self._pipeline).lora_state_dict(weights, **extra)
        return state[0] if isinstance(state, tuple) else state

    def on_text_encoders(self, adapter_ids: Iterable[str]) -> bool:
        """Whether any of them (fetched; an unknown one counts) has text-encoder weights:
        the continuous loop computes adapters per row in the denoiser only."""
        with self._lock:
            return any(self._on_text_encoders.get(i, True) for i in adapter_ids)

    @property
    def max_loaded(self) -> int:
        """`max_adapters_per_replica`: the adapters the pipeline keeps loaded."""
        return self._max_loaded

    def holds(self, adapter_ids: Iterable[str]) -> bool:
        """Whether all of them are loaded in the pipeline; ask it under the gate."""
        return all(adapter_id in self._loaded for adapter_id in adapter_ids)

    def activate(self, adapters: tuple[AdapterWeight, ...] | LoopStep | LoadForLoop) -> None:
        """Make the shared modules right for `adapters` (id and scale pairs; () is the base
        model), or for the continuous loop's keys (`loop_adapters.py`). Only while no
        pipeline call runs: it is the `AdapterGate`'s switch."""
        if isinstance(adapters, LoopStep):
            # Each denoiser row picks its own adapters (`mixed_lora.py`); everything else,
            # the text encoders the loop's prompts go through, runs as the base model.
            if self._loaded:
                self._pipeline.disable_lora()
            return
        if isinstance(adapters, LoadForLoop):
            self._load_all(sorted(adapters.ids), keep=adapters.keep)
            return
        if not adapters:
            if self._loaded:
                self._pipeline.disable_lora()
            return
        ids = [adapter_id for adapter_id, _ in adapters]
        self._load_all(ids)
        self._pipeline.enable_lora()
        self._pipeline.set_adapters(ids, [float(scale) for _, scale in adapters])

    def _load_all(self, ids: list[str], keep: frozenset[str] = frozenset()) -> None:
        for adapter_id in ids:
            if adapter_id not in self._loaded:
                self._evict(keep=[*ids, *keep])
                self._load(adapter_id)
            with self._lock:
                self._loaded.move_to_end(adapter_id)

    def _evict(self, keep: list[str]) -> None:
        """Unload least recently used adapters until one more fits (never one of `keep`)."""
        for adapter_id in list(self._loaded):
            if len(self._loaded) < self._max_loaded:
                return
            if adapter_id not in keep:
                self._pipeline.delete_adapters([adapter_id])
                with self._lock:
                    del self._loaded[adapter_id]
                logger.info("adapter %s unloaded (least recently used)", adapter_id)

    def _load(self, adapter_id: str) -> None:
        if self.missing([adapter_id]):
            # Not prefetched (a job reached the engine without the deployment's prefetch):
            # fetched here, with every call of the replica waiting.
            logger.warning("adapter %s was not prefetched; fetching it now", adapter_id)
            self.prefetch([adapter_id])
        with self._lock:
            weights, signature = self._staged[adapter_id]
        if _signature(weights) != signature:
            # Replaced since it was checked (a watched directory's file, say): checked again,
            # so that a file that no longer fits the model is never loaded.
            with self._lock:
                self._staged.pop(adapter_id, None)
            self.prefetch([adapter_id])
            with self._lock:
                weights, _ = self._staged[adapter_id]
        started = time.perf_counter()
        try:
            self._pipeline.load_lora_weights(weights, adapter_name=adapter_id)
        except Exception as error:
            self._remove_partial(adapter_id)
            with self._lock:
                self._staged.pop(adapter_id, None)  # fetched and checked again next time
            logger.warning("adapter %s: loading its weights failed", adapter_id, exc_info=True)
            raise AdapterUnavailable(adapter_id, "loading its weights failed") from error
        seconds = time.perf_counter() - started
        with self._lock:
            self._loaded[adapter_id] = None
        self.loads += 1
        self.load_seconds = [*self.load_seconds[-99:], seconds]
        logger.info("adapter %s loaded in %.3f s", adapter_id, seconds)
        for hook in self.after_load:
            hook()
        if self._metrics is not None:
            self._metrics.adapter_loaded(adapter_id, seconds)

    def _remove_partial(self, adapter_id: str) -> None:
        """Delete what a failed load injected (its layers in some components, maybe)."""
        try:
            self._pipeline.delete_adapters([adapter_id])
        except Exception:
            logger.exception("removing the layers of adapter %s failed", adapter_id)
        if self._loaded:
            return
        # No adapter left: the modules run as the base model (wrapped layers with no
        # adapter compute the base layer alone).
        self._pipeline.disable_lora()


def _signature(path: str) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten: (inode, size, mtime in ns);
    () if it is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return ()
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _local_weights(source: str, weight_name: str | None) -> str:
    """The local weights file of an adapter: a file, a file in a directory, or a hub file
    (downloaded into the Hugging Face cache)."""
    path = Path(source)
    if path.is_file():
        return str(path)
    if path.is_dir():
        if weight_name is not None:
            candidate = path / weight_name
            if not candidate.is_file():
                raise FileNotFoundError(f"{source!r} has no file {weight_name!r}")
            return str(candidate)
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(
                f"{source!r} holds {len(files)} .safetensors files; set `weight_name`"
            )
        return str(files[0])
    if path.is_absolute() or source.startswith("."):
        raise FileNotFoundError(f"no such file or directory {source!r}")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(source, weight_name or DEFAULT_WEIGHT_NAME)
