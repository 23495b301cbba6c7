"""The ranks of a parallel replica step in lockstep: rank 0 leads, the others follow.

Rank 0 is the Serve replica. Everything above its denoiser (the batch queue, the continuous
loop, prompt encoding, decoding, previews, cancellation) is the single-device code,
unchanged; only the denoiser's forward is shared. `LeadingForward` replaces rank 0's
`denoiser.forward`: under one lock (the replica's worker threads take turns: the ranks must
run the same collectives in the same order), it sends the forward's arguments to every rank
and runs its own part; `follow` is the other ranks' loop, which runs the same forward on the
same arguments. Each rank's forward then splits the work itself (`context_parallel.py`,
`cfg_split.py`) and ends with the whole output.

The arguments travel as one pickled description (`broadcast_object_list`: the structure of
args and kwargs, with each tensor replaced by its shape and dtype) and one broadcast per
tensor, so a GPU group moves tensors over NCCL rather than through pickles.

A group that fails a collective (a rank died, or stalled past the process group's timeout)
is done: nothing can tell how far the others got. `GroupFailed` says so; the replica marks
itself broken and Serve replaces it with a new group (`rank_group.py`). While no forward
runs, a heartbeat every `heartbeat_s` keeps the followers' wait within the timeout and finds
a rank that died while idle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from deployments.jobs import ReplicaBroken

logger = logging.getLogger("ray.serve")

# What rank 0 sends besides a forward.
HEARTBEAT = "heartbeat"
STOP = "stop"


class GroupFailed(ReplicaBroken):
    """A collective of the replica's rank group failed: the group cannot run again."""


@dataclass(frozen=True)
class _TensorSlot:
    """Where a tensor was in the arguments: the receivers allocate it, then it is broadcast.
    Every tensor travels on the group's device (NCCL moves no CPU tensor); one that was on
    the CPU is put back there."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_cpu: bool = False


def _described(value: Any, tensors: list[torch.Tensor], device: torch.device | None = None) -> Any:
    """`value` with every tensor replaced by a `_TensorSlot`; the tensors, on `device` (if
    given), appended in order."""
    if isinstance(value, torch.Tensor):
        on_cpu = value.device.type == "cpu"
        tensors.append((value if device is None else value.to(device)).contiguous())
        return _TensorSlot(len(tensors) - 1, tuple(value.shape), value.dtype, on_cpu)
    if isinstance(value, dict):
        return {key: _described(item, tensors, device) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_described(item, tensors, device) for item in value)
    return value


def _filled(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, _TensorSlot):
        tensor = tensors[value.index]
        return tensor.cpu() if value.on_cpu else tensor
    if isinstance(value, dict):
        return {key: _filled(item, tensors) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_filled(item, tensors) for item in value)
    return value


def _send(command: Any, device: torch.device) -> list[torch.Tensor]:
    """Rank 0: broadcast `command` (a forward's `(args, kwargs)`, or a word); the tensors."""
    tensors: list[torch.Tensor] = []
    description = [_described(command, tensors, device)]
    dist.broadcast_object_list(description, src=0, device=device)
    for tensor in tensors:
        dist.broadcast(tensor, src=0)
    return tensors


def _receive(device: torch.device) -> Any:
    """A follower: the next command of rank 0, its tensors on `device`."""
    description: list[Any] = [None]
    dist.broadcast_object_list(description, src=0, device=device)
    slots: list[_TensorSlot] = []
    _described_slots(description[0], slots)
    tensors = [torch.empty(slot.shape, dtype=slot.dtype, device=device) for slot in slots]
    for tensor in tensors:
        dist.broadcast(tensor, src=0)
    return _filled(description[0], tensors)


def _described_slots(value: Any, slots: list[_TensorSlot]) -> None:
    """The slots of a description, in the order `_described` made them."""
    if isinstance(value, _TensorSlot):
        slots.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _described_slots(item, slots)
    elif isinstance(value, list | tuple):
        for item in value:
            _described_slots(item, slots)


class LeadingForward:
    """Rank 0's denoiser forward: every call is sent to the followers and run by all ranks
    at once. Installed with `lead(denoiser, ...)`."""

    def __init__(self, forward: Callable[..., Any], device: torch.device, heartbeat_s: float):
        self._forward = forward
        self._device = device
        self._lock = threading.Lock()
        self._failed: BaseException | None = None
        self._last_sent = time.monotonic()
        self._stopped = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._beat, args=(heartbeat_s,), name="rank-group-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._check()
            try:
                _send((args, kwargs), self._device)
                self._last_sent = time.monotonic()
                return self._forward(*args, **kwargs)
            except Exception as error:
                raise self._fail(error) from error

    @property
    def failed(self) -> BaseException | None:
        """What broke the group, or None while it works."""
        return self._failed

    def _check(self) -> None:
        if self._failed is not None:
            raise GroupFailed(f"the rank group failed: {type(self._failed).__name__}")

    def _fail(self, error: BaseException) -> GroupFailed:
        if self._failed is None:
            self._failed = error
            logger.error("the rank group failed; the replica stops serving", exc_info=error)
        return GroupFailed(f"the rank group failed: {type(error).__name__}")

    def _beat(self, interval_s: float) -> None:
        while not self._stopped.wait(interval_s / 4):
            if time.monotonic() - self._last_sent < interval_s:
                continue
            with self._lock:
                if self._failed is not None or self._stopped.is_set():
                    return
                try:
                    _send(HEARTBEAT, self._device)
                    self._last_sent = time.monotonic()
                except Exception as error:
                    self._fail(error)
                    return

    def stop(self) -> None:
        """Tell the followers to end their loops (a replica that shuts down)."""
        self._stopped.set()
        with self._lock:
            if self._failed is None:
                try:
                    _send(STOP, self._device)
                except Exception as error:  # the group is going away either way
                    logger.info("the rank group did not take its stop: %r", error)
                # A call still running would wait at its next forward for followers that left.
                self._failed = RuntimeError("the replica stopped its rank group")


def lead(denoiser: torch.nn.Module, device: torch.device, heartbeat_s: float) -> LeadingForward:
    """Make rank 0's `denoiser` lead its group (see `LeadingForward`)."""
    leading = LeadingForward(denoiser.forward, device, heartbeat_s)
    denoiser.forward = leading
    return leading


@torch.inference_mode()
def follow(denoiser: torch.nn.Module, device: torch.device) -> int:
    """A follower's loop: run each forward rank 0 sends, until it says stop. Returns how many
    forwards it ran; raises if the group fails (the actor's task then ends with it)."""
    forwards = 0
    while True:
        command = _receive(device)
        if command == STOP:
            return forwards
        if command == HEARTBEAT:
            continue
        args, kwargs = command
        denoiser(*args, **kwargs)
        forwards += 1
