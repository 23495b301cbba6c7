"""Keeps pipeline calls with different adapter sets from ever overlapping on shared modules.

LoRA adapters live inside a replica's SHARED modules: which adapters are active, and at what
scale, is module state that every concurrent call reads at each forward (design note 9). So
a call may only run while the modules are set for its own adapter set, and nobody may change
them until it ends. `AdapterGate` admits calls by their set (a hashable key: the adapter ids
AND their scales; `()` is the base model):
- calls with the set that is running enter at once and run concurrently;
- a call with another set waits until every running call has left; then, with nothing
  running, the gate calls `switch(key)` (which loads, unloads and sets adapters) and admits
  it, with the calls of its set queued right behind it;
- it is first come, first served: a call waits behind every earlier waiter, even when its
  set is the one running, so a steady stream of one set cannot starve another.
A failed switch fails only the call that triggered it (its exception propagates); the gate
then knows the modules' state is unknown, and the next call switches again.

It runs in the worker threads (never on the event loop): `enter` blocks.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator

# What the modules are set for when it is unknown (after a failed switch).
_UNKNOWN = object()


class CallAbandoned(Exception):
    """Raised by `enter` for a call whose `cancelled` event was set while it waited: it
    leaves without switching (a batch whose clients left must not unload others' adapters)."""


class AdapterGate:
    """Admits pipeline calls by adapter set; see the module's docstring.

    `switch(key)` makes the shared modules right for `key`; it is called with no call
    running, and only when `key` differs from the set the modules were last switched to
    (initially `initial`, the base model's `()`)."""

    def __init__(self, switch: Callable[[Hashable], None], initial: Hashable = ()) -> None:
        self._switch = switch
        self._condition = threading.Condition()
        self._applied: object = initial  # what the modules are set for
        self._running = 0  # calls inside, all with the key `_applied`
        self._waiting: deque[object] = deque()  # tickets, first come first served
        self.switches = 0  # switches made (tests and counters read it)

    @contextlib.contextmanager
    def enter(self, key: Hashable, cancelled: threading.Event | None = None) -> Iterator[None]:
        """Hold the gate for one call with adapter set `key` (blocks until admitted). Raises
        `CallAbandoned`, without switching, if `cancelled` is set when its turn comes."""
        self._admit(key, cancelled)
        try:
            yield
        finally:
            with self._condition:
                self._running -= 1
                self._condition.notify_all()

    def _admit(self, key: Hashable, cancelled: threading.Event | None) -> None:
        ticket = object()
        with self._condition:
            self._waiting.append(ticket)
            try:
                while not (
                    self._waiting[0] is ticket and (self._running == 0 or self._applied == key)
                ):
                    self._condition.wait()
                if cancelled is not None and cancelled.is_set():
                    raise CallAbandoned()
                if self._applied != key:
                    # Nothing runs (the loop's condition), and while this thread holds the
                    # condition's lock nothing can enter: the modules are this call's.
                    self._applied = _UNKNOWN
                    self._switch(key)
                    self._applied = key
                    self.switches += 1
                self._running += 1
            finally:
                self._waiting.remove(ticket)
                # The next waiter may be of the same set, and may enter now.
                self._condition.notify_all()

    @property
    def running(self) -> int:
        with self._condition:
            return self._running
