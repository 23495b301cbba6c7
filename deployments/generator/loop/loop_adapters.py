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

Residency across lanes. The replica's lanes share the `max_adapters_per_replica` slots: each
lane publishes the adapters its images in flight use (`publish`), a load keeps every lane's
(it never evicts what another lane steps with: that lane would load it back for its next
step, and the first lane again, at every step; nor does it load them), and a job joins a
lane only if its adapters fit the slots beside every lane's in flight (`reserve`);
otherwise it waits for images to finish and free one, and its claim on the slots (one
claim at a time) keeps the other lanes from taking new adapters meanwhile. So each job
loads its adapters at most once. A job with more adapters than slots runs request-level.
"""

from __future__ import annotations

import contextlib
import threading
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
        self._changed = threading.Condition()  # guards `_in_flight`; told of every change
        self._in_flight: dict[int, frozenset[str]] = {}  # by lane (`id`)
        # (lane, adapters): what the first job refused a slot waits for; the other lanes
        # count it as taken.
        self._claim: tuple[int, frozenset[str]] | None = None

    @property
    def slots(self) -> int:
        return self._store.max_loaded

    def publish(self, lane: object, in_use: Iterable[str]) -> None:
        """The adapters `lane`'s images in flight use now (nothing: an empty set). Waiting
        lanes are woken only by a change (two idle lanes would wake each other forever)."""
        in_use = frozenset(in_use)
        with self._changed:
            if self._in_flight.get(id(lane)) != in_use:
                self._in_flight[id(lane)] = in_use
                self._changed.notify_all()

    def _others(self, lane: object) -> frozenset[str]:
        with self._changed:
            return frozenset(self._others_locked(lane))

    def _others_locked(self, lane: object) -> set[str]:
        """What the other lanes use in flight, and the adapters that a job refused a slot
        in another lane waits for (so that lanes stop taking new adapters until it has
        one: no job waits forever behind others' steady use)."""
        taken = [ids for key, ids in self._in_flight.items() if key != id(lane)]
        if self._claim is not None and self._claim[0] != id(lane):
            taken.append(self._claim[1])
        return {adapter_id for ids in taken for adapter_id in ids}

    def reserve(self, lane: object, in_use: set[str], joining: set[str]) -> bool:
        """Whether images with adapters `joining` may join `lane` (whose images in flight,
        and those joining before them, use `in_use`): all of them fit the slots beside the
        other lanes' in flight and the claim, or the loop has nothing else in flight. If
        so, they count as `lane`'s at once (two lanes admitting together must not both take
        the last slot), until its next `publish`; if not, and no lane claims yet, `joining`
        becomes the claim (one at a time: two lanes' claims would block each other), until
        its lane's `unclaim`."""
        with self._changed:
            others = self._others_locked(lane)
            wanted = in_use | joining
            if (others or in_use) and len(others | wanted) > self._store.max_loaded:
                if self._claim is None:
                    self._claim = (id(lane), frozenset(joining))
                return False
            self._in_flight[id(lane)] = self._in_flight.get(id(lane), frozenset()) | wanted
            return True

    def unclaim(self, lane: object) -> None:
        """`lane` admits again from the start of its line: its claim, if it holds it, is
        made anew (or not: its job may fit now)."""
        with self._changed:
            if self._claim is not None and self._claim[0] == id(lane):
                self._claim = None

    def wait(self, timeout_s: float) -> None:
        """Until a lane publishes a change (images finished: a slot may be free)."""
        with self._changed:
            self._changed.wait(timeout_s)

    def load(self, lane: object, adapters: tuple[AdapterWeight, ...], in_use: set[str]) -> None:
        """Load a joining job's adapters, keeping those `lane`'s images (`in_use`) and every
        other lane's use. Raises `AdapterUnavailable` for one that cannot be loaded: the job
        fails alone."""
        ids = frozenset(adapter_id for adapter_id, _ in adapters)
        # Loaded already (the common case): no gate switch, which would wait for every
        # lane's step in flight to end. Evicted before its first step, it loads then.
        if ids and not self._store.holds(ids):
            keep = frozenset(in_use) | self._others(lane)
            with self._store.gate.enter(LoadForLoop(ids, keep)):
                pass

    def encoding(self) -> contextlib.AbstractContextManager[None]:
        """Hold while the loop encodes prompts: the text encoders are the base model's
        then (a request-level call's set would apply to them otherwise, and its loads and
        unloads would change them meanwhile)."""
        return self._store.gate.enter(LOOP_STEP)

    def accepts(self, adapters: tuple[AdapterWeight, ...]) -> bool:
        """Whether the loop can run these adapters: none touches a text encoder."""
        return not self._store.on_text_encoders(adapter_id for adapter_id, _ in adapters)

    def forward(
        self, lane: object, family: FlowFamily, images: list[ImageState]
    ) -> list[torch.Tensor]:
        """`family.forward(images)` with each row's own adapters (those missing, evicted by a
        request-level call, loaded again beside the other lanes')."""
        needed = frozenset(adapter_id for image in images for adapter_id, _ in image.adapters)
        while True:
            with self._store.gate.enter(LOOP_STEP):
                if self._store.holds(needed):
                    rows = [row.adapters for row in family.rows(images)]
                    with routed(rows, self._device):
                        return family.forward(images)
            with self._store.gate.enter(LoadForLoop(needed, self._others(lane))):
                pass
