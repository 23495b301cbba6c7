"""The continuous loop's side of the adapter gate: steps whose images each have their own
adapters, on shared modules that request-level calls switch between adapter sets.

Each loop step holds the gate (`adapter_gate.py`) with one key, `LOOP_STEP`, for which the
modules' adapter SET does not matter: every LoRA layer computes each row's own adapters
(`mixed_lora.py`). Steps of the replica's lanes share that key and run side by side; a
request-level call with an adapter set takes its turn between steps, never during one.
What a step does need is its images' adapters loaded in the pipeline: inside the gate it
checks (nothing can load or unload while it holds the gate), and where one is missing (not
loaded yet, or evicted by a request-level call since) it takes the gate with a
`LoadForLoop` key, whose switch loads them, and tries again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from deployments.generator.adapters.adapter_store import LOOP_STEP, AdapterStore, LoadForLoop
from deployments.generator.adapters.mixed_lora import install, routed
from deployments.generator.loop.families import FlowFamily, ImageState
from deployments.jobs import AdapterWeight


class LoopAdapters:
    def __init__(
        self, store: AdapterStore, denoiser: torch.nn.Module, device: torch.device
    ) -> None:
        self._store = store
        self._device = device
        # Every LoRA layer, now and after each load (a new adapter may wrap new modules),
        # computes per-row adapters in a routed forward; outside one, peft's own.
        store.after_load.append(lambda: install(denoiser))
        install(denoiser)

    def load(self, adapters: tuple[AdapterWeight, ...], in_use: Iterable[str]) -> None:
        """Load a joining job's adapters (keeping those the lane's images use). Raises
        `AdapterUnavailable` for one that cannot be loaded: the job fails alone."""
        ids = {adapter_id for adapter_id, _ in adapters}
        if ids:
            with self._store.gate.enter(LoadForLoop(frozenset(ids | set(in_use)))):
                pass

    def encoding(self) -> contextlib.AbstractContextManager[None]:
        """Hold while the loop encodes prompts: the text encoders are the base model's
        then (a request-level call's set would apply to them otherwise, and its loads and
        unloads would change them meanwhile)."""
        return self._store.gate.enter(LOOP_STEP)

    def accepts(self, adapters: tuple[AdapterWeight, ...]) -> bool:
        """Whether the loop can run these adapters: none touches a text encoder."""
        return not self._store.on_text_encoders(adapter_id for adapter_id, _ in adapters)

    def forward(self, family: FlowFamily, images: list[ImageState]) -> list[torch.Tensor]:
        """`family.forward(images)` with each row's own adapters."""
        needed = frozenset(adapter_id for image in images for adapter_id, _ in image.adapters)
        while True:
            with self._store.gate.enter(LOOP_STEP):
                if self._store.holds(needed):
                    rows = [row.adapters for row in family.rows(images)]
                    with routed(rows, self._device):
                        return family.forward(images)
            with self._store.gate.enter(LoadForLoop(needed)):
                pass
