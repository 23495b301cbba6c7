"""What a loop forward tells the per-image cache hooks: which image each row belongs to, and
how a hooked module runs over only some of the rows.

The lane (`denoise_loop.py`) wraps each forward in `rows(...)`, giving each row its image's
cache states (`ImageState.caches`, one dict an image, keyed by the hook that keeps each
state). Thread-local, like the LoRA routing (`mixed_lora.py`): a forward runs in one worker
thread, and outside `rows` (a request-level call) the hooks hand the call to diffusers.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from deployments.generator.adapters.mixed_lora import narrowed

# Per-row arguments of a hooked module beside its first one (the hidden states): the encoder
# stream, the timestep's embedding (and its modulation parameters) and attention masks.
# Rotary embeddings are shared by every row.
_PER_ROW_ARGUMENTS = (
    "hidden_states",
    "encoder_hidden_states",
    "temb",
    "attention_mask",
    "encoder_attention_mask",
)

ImageCaches = dict  # one image's cache states, by the hook that keeps each


class LoopForward:
    """One loop forward's rows: each row's image caches, and the images with their rows."""

    def __init__(self, rows: Sequence[ImageCaches]) -> None:
        self.rows = list(rows)
        self.state: dict[object, Any] = {}  # what a cache's hooks share within this forward
        self._groups: list[tuple[ImageCaches, torch.Tensor, list[int]]] | None = None
        self._undo: list[Callable[[], None]] = []

    def keep(self, restore: Callable[[], None]) -> None:
        """`restore` puts back an image's state as it was before this forward changed it:
        run if the forward fails (it runs again, in halves or alone, from the same state)."""
        self._undo.append(restore)

    def undo(self) -> None:
        for restore in reversed(self._undo):
            restore()
        self._undo.clear()

    def groups(self, device: torch.device) -> list[tuple[ImageCaches, torch.Tensor, list[int]]]:
        """Each image with its rows (on the device, and on the host), in order of first
        row."""
        if self._groups is None:
            by_image: dict[int, tuple[ImageCaches, list[int]]] = {}
            for row, caches in enumerate(self.rows):
                by_image.setdefault(id(caches), (caches, []))[1].append(row)
            self._groups = [
                (caches, torch.tensor(indices, device=device), indices)
                for caches, indices in by_image.values()
            ]
        return self._groups


class _ThisThread(threading.local):
    forward: LoopForward | None = None


_THIS_THREAD = _ThisThread()


@contextlib.contextmanager
def rows(caches: Sequence[ImageCaches]) -> Iterator[None]:
    """Within the block, this thread's denoiser forward runs rows whose images' cache states
    are `caches[i]` (one entry a row: an image's rows share one dict)."""
    forward = _THIS_THREAD.forward = LoopForward(caches)
    try:
        yield
    except BaseException:
        forward.undo()  # the images' states as before: the step runs again from them
        raise
    finally:
        _THIS_THREAD.forward = None


def current() -> LoopForward | None:
    """The loop forward this thread runs, or None (a request-level call)."""
    return _THIS_THREAD.forward


class Narrowing:
    """Runs one module's forward over some rows of its call: its per-row arguments (the
    first, and those named above) narrowed to them, and the LoRA routing too."""

    def __init__(self, module: torch.nn.Module, also: tuple[str, ...] = ()) -> None:
        """`also`: names of the module's other per-row arguments."""
        parameters = inspect.signature(type(module).forward).parameters.values()
        self._names = [
            p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ][1:]  # past `self`
        self._per_row = {*_PER_ROW_ARGUMENTS, *also}

    def call(
        self,
        forward: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        rows: torch.Tensor,
        indices: list[int],
        total: int,
    ) -> Any:
        """`forward(*args, **kwargs)` over the rows at `rows` (`indices` on the host) of a
        call of `total` rows."""
        if len(args) > len(self._names):
            raise ValueError("a hooked module got more positional arguments than it names")
        bound = dict(zip(self._names, args, strict=False))
        bound.update(kwargs)
        first = self._names[0] if self._names else None
        for name, value in list(bound.items()):
            if name == first or name in self._per_row or "temb" in name:
                bound[name] = rows_of(value, rows, total)
        with narrowed(indices):
            return forward(**bound)


def rows_of(value: Any, rows: torch.Tensor, total: int) -> Any:
    """`value`'s rows at `rows` where it has one per row of the forward (tensors, and
    tuples or lists of them); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == total:
        return value.index_select(0, rows)
    if isinstance(value, tuple | list):
        return type(value)(rows_of(item, rows, total) for item in value)
    return value
