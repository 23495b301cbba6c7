"""Loading the one shared pipeline of a replica, and the per-request views that run on it.

A replica holds ONE diffusers pipeline for its whole life. Each request runs on a view: a new
pipeline object of the same class over the same component objects (same weights in memory),
except for a fresh scheduler, because schedulers keep per-run state (step index, sigmas) and
a shared one fails under concurrency (`IndexError: index 21 is out of bounds ...`).

Two diffusers traps are avoided here on purpose:
- `DiffusionPipeline.from_pipe` casts the shared modules to float32 unless given a dtype
  (diffusers issue 12754), doubling a bf16 model's memory on the first request. The view is
  built by calling the pipeline class on the shared components instead: no `.to()`, no copy.
- Fast (Rust) tokenizers raise `RuntimeError: Already borrowed` when two threads use one at
  once. Every view's `encode_prompt` runs under one lock per shared pipeline.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from deployments.config import ModelConfig
from deployments.embedded_model import ensure_embedded_model, is_embedded

logger = logging.getLogger("ray.serve")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return _DTYPES[requested]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_pipeline(model: ModelConfig) -> DiffusionPipeline:
    """Load the model's pipeline onto its device, the same way for every kind of source.

    Gated hub models (SD3 is one) read the Hugging Face token from `HF_TOKEN`.
    """
    device = resolve_device(model.device)
    dtype = resolve_dtype(model.dtype, device)
    source: str | Path = model.source
    if is_embedded(model.source):
        source = ensure_embedded_model(model.source)
    logger.info("loading %s from %s as %s on %s", model.id, source, dtype, device)
    pipeline = DiffusionPipeline.from_pretrained(source, revision=model.revision, dtype=dtype)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class RequestPipelines:
    """Makes per-request views of one shared pipeline."""

    def __init__(self, shared: DiffusionPipeline) -> None:
        self.shared = shared
        self._encode_lock = threading.Lock()

    def view(self) -> DiffusionPipeline:
        """A pipeline over the shared weights with its own scheduler, safe to run in a thread."""
        components: dict[str, Any] = dict(self.shared.components)
        scheduler = self.shared.scheduler
        components["scheduler"] = type(scheduler).from_config(scheduler.config)
        view = type(self.shared)(**components)
        view.set_progress_bar_config(disable=True)
        # An instance attribute shadows the method, so the pipeline's own call to
        # `self.encode_prompt(...)` goes through the lock.
        view.encode_prompt = _serialized(view.encode_prompt, self._encode_lock)
        return view


def _serialized(method, lock: threading.Lock):
    @functools.wraps(method)
    def locked(*args, **kwargs):
        with lock:
            return method(*args, **kwargs)

    return locked
