"""First-Block-Cache per image in the continuous loop: each image decides at its own step
whether the denoiser's blocks past the first run for it, on its own residuals.

diffusers' First-Block-Cache (`optimizations.cache.kind: first_block`, hooked by
`model/cache_hooks.py` for request-level calls) runs the first transformer block, compares its
residual (output minus input) with the one of the last step that ran every block, and when
the relative change, `mean|r - r_prev| / mean|r_prev|`, is at most the threshold, skips the
other blocks: their output is the first block's plus the residual they added at that step.
It decides once for a whole call's batch, and its state is the call's. The loop's forward
holds images at different steps of different requests, so here each image keeps its own
residuals (on its `ImageState`) and decides on its own rows (an image's conditional and
unconditional rows together, as its request alone decides on its batch of one), and the
blocks past the first run only over the rows of the images that compute: a step costs the
first block for every image and the rest only for those that changed. An image's result
does not depend on what shares its forward (unlike a request-level batch's), and equals its
request alone with the same cache within the tolerance of batched arithmetic
(`tests/pipeline/test_loop_cache.py`).

How. A hook of ours sits on every transformer block, outside diffusers' cache hook. In a
request-level call (no rows given in this thread) it passes the call on to diffusers' hook,
unchanged. In a loop forward (`PerImageFirstBlockCache.rows` around it) it goes past
diffusers' hook to the block itself: the first block's hook decides per image and, for the
images that skip, adds their cached residuals at once; every later block runs on the rows that
compute (its per-row arguments narrowed to them, LoRA routing too: `mixed_lora.narrowed`) and
leaves the other rows as they came; the last block's hook stores each computing image's new
residuals. The forward around the blocks (embeddings, the final norm and projection) sees
every row, as always.

Which arguments are per row: a block's hidden and encoder streams (diffusers' block registry
names them) and the arguments named below; a block taking another per-row tensor would fail
loudly (its rows would not match), never mix images silently.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import ModelHook

from deployments.generator.adapters.mixed_lora import narrowed

_HOOK = "image_service_per_image_first_block"
# Per-row block arguments beside the hidden and encoder streams: the timestep's embedding
# (and its modulation parameters) and attention masks. Rotary embeddings are shared.
_PER_ROW_ARGUMENTS = ("temb", "attention_mask", "encoder_attention_mask")
# Where a denoiser keeps its `PerImageFirstBlockCache` (an attribute of the shared module).
_ATTRIBUTE = "_image_service_per_image_cache"


@dataclass(eq=False)
class ImageResiduals:
    """One image's cache: its first block's residual and what the other blocks added to each
    stream, at the last step that ran every block (None before its first step)."""

    head: torch.Tensor | None = None
    tail: tuple[torch.Tensor, torch.Tensor | None] | None = None
    steps: int = 0  # forwards it took part in
    computed: int = 0  # of them, forwards that ran every block for it


@dataclass
class _Forward:
    """One loop forward's rows: which image each belongs to, and what its blocks decided."""

    images: list[ImageResiduals]
    # The images that run every block this forward, with their rows.
    computing_images: list[tuple[ImageResiduals, torch.Tensor]] = field(default_factory=list)
    computing: torch.Tensor | None = None  # their rows, together
    computing_rows: list[int] = field(default_factory=list)  # the same, on the host
    everyone: bool = True  # every row computes (the blocks run unnarrowed)
    head_output: tuple[torch.Tensor, torch.Tensor | None] | None = None


class _ThisThread(threading.local):
    forward: _Forward | None = None


class PerImageFirstBlockCache:
    """The per-image First-Block-Cache of one shared denoiser (see the module's docstring)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._thread = _ThisThread()

    @contextlib.contextmanager
    def rows(self, residuals: Sequence[ImageResiduals]) -> Iterator[None]:
        """Within the block, this thread's denoiser forward runs rows whose images' caches
        are `residuals[i]` (one entry per row: an image's rows share one)."""
        self._thread.forward = _Forward(list(residuals))
        try:
            yield
        finally:
            self._thread.forward = None

    def forward(self) -> _Forward | None:
        return self._thread.forward


def install(denoiser: torch.nn.Module, threshold: float) -> PerImageFirstBlockCache:
    """Hook the per-image cache onto the blocks diffusers' First-Block-Cache hooked (call it
    right after `apply_first_block_cache`)."""
    cache = PerImageFirstBlockCache(threshold)
    blocks = [
        module
        for module in denoiser.modules()
        if getattr(module, "_diffusers_hook", None) is not None
        and (
            module._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK) is not None
            or module._diffusers_hook.get_hook(_FBC_BLOCK_HOOK) is not None
        )
    ]
    if len(blocks) < 2:
        raise ValueError("First-Block-Cache hooked fewer than two blocks")
    for index, block in enumerate(blocks):
        registry = HookRegistry.check_if_exists_or_initialize(block)
        fbc = registry.get_hook(_FBC_LEADER_BLOCK_HOOK) or registry.get_hook(_FBC_BLOCK_HOOK)
        role = "head" if index == 0 else "tail" if index == len(blocks) - 1 else "middle"
        registry.register_hook(_BlockHook(cache, fbc, role), _HOOK)
    setattr(denoiser, _ATTRIBUTE, cache)
    return cache


def per_image_cache_of(denoiser: torch.nn.Module | None) -> PerImageFirstBlockCache | None:
    """The denoiser's per-image cache, if `install` hooked one."""
    return getattr(denoiser, _ATTRIBUTE, None)


class _BlockHook(ModelHook):
    """On one block: diffusers' hook in request-level calls, the per-image cache in the
    loop's forwards."""

    _is_stateful = False  # the state lives on the images

    def __init__(self, cache: PerImageFirstBlockCache, fbc: ModelHook, role: str) -> None:
        super().__init__()
        self._cache = cache
        self._fbc = fbc  # diffusers' hook on this block, and its block metadata
        self._role = role
        self._names: list[str] | None = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self._cache.forward()
        if forward is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        block = self._fbc.fn_ref.original_forward  # past diffusers' hook
        if self._role == "head":
            return self._head(forward, block, args, kwargs)
        if forward.everyone:
            output = block(*args, **kwargs)
        elif forward.computing is None:  # every image skips: the rows pass as they came
            output = self._as_output(*self._streams(args, kwargs))
        else:
            output = self._narrowed(forward, module, block, args, kwargs)
        if self._role == "tail":
            self._store(forward, output)
        return output

    def _head(self, forward: _Forward, block: Any, args: tuple, kwargs: dict) -> Any:
        hidden_in, _ = self._streams(args, kwargs)
        output = block(*args, **kwargs)
        hidden, encoder = self._split(output)
        residual = hidden - hidden_in
        skipping: list[tuple[ImageResiduals, torch.Tensor]] = []
        for image, rows, indices in _groups(forward.images, hidden.device):
            image.steps += 1
            mine = residual.index_select(0, rows)
            if self._changed(image, mine):
                image.head = mine
                image.computed += 1
                forward.computing_images.append((image, rows))
                forward.computing_rows.extend(indices)
            else:
                skipping.append((image, rows))
        forward.everyone = not skipping
        if forward.computing_images:
            forward.computing = torch.cat([rows for _, rows in forward.computing_images])
        forward.head_output = (hidden, encoder)
        if not skipping:
            return output
        hidden, encoder = hidden.clone(), None if encoder is None else encoder.clone()
        for image, rows in skipping:
            cached_hidden, cached_encoder = image.tail
            hidden.index_add_(0, rows, cached_hidden)
            if encoder is not None and cached_encoder is not None:
                encoder.index_add_(0, rows, cached_encoder)
        return self._as_output(hidden, encoder, like=output)

    def _changed(self, image: ImageResiduals, residual: torch.Tensor) -> bool:
        """diffusers' test (`FBCHeadBlockHook._should_compute_remaining_blocks`), on the
        image's own rows."""
        if image.head is None or image.tail is None:
            return True
        change = (residual - image.head).abs().mean() / image.head.abs().mean()
        return change.item() > self._cache.threshold

    def _narrowed(
        self, forward: _Forward, module: torch.nn.Module, block: Any, args: tuple, kwargs: dict
    ) -> Any:
        """The block over the computing rows; the others as they came."""
        rows = forward.computing
        hidden_in, encoder_in = self._streams(args, kwargs)
        bound = self._bind(module, args, kwargs)
        total = hidden_in.shape[0]
        names = {
            self._fbc._metadata.hidden_states_argument_name,
            self._fbc._metadata.encoder_hidden_states_argument_name,
            *_PER_ROW_ARGUMENTS,
        }
        for name, value in list(bound.items()):
            if name in names or "temb" in name:
                bound[name] = _rows_of(value, rows, total)
        with narrowed(forward.computing_rows):
            output = block(**bound)
        hidden_part, encoder_part = self._split(output)
        hidden = hidden_in.index_copy(0, rows, hidden_part)
        encoder = None
        if encoder_part is not None and encoder_in is not None:
            encoder = encoder_in.index_copy(0, rows, encoder_part)
        return self._as_output(hidden, encoder, like=output)

    def _store(self, forward: _Forward, output: Any) -> None:
        """Each computing image's residuals: what the blocks past the first added."""
        hidden, encoder = self._split(output)
        head_hidden, head_encoder = forward.head_output
        for image, rows in forward.computing_images:
            tail_encoder = None
            if encoder is not None and head_encoder is not None:
                tail_encoder = encoder.index_select(0, rows) - head_encoder.index_select(0, rows)
            tail_hidden = hidden.index_select(0, rows) - head_hidden.index_select(0, rows)
            image.tail = (tail_hidden, tail_encoder)

    def _streams(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        metadata = self._fbc._metadata
        hidden = metadata._get_parameter_from_args_kwargs(
            metadata.hidden_states_argument_name, args, kwargs
        )
        encoder = None
        if metadata.return_encoder_hidden_states_index is not None:
            encoder = metadata._get_parameter_from_args_kwargs(
                metadata.encoder_hidden_states_argument_name, args, kwargs
            )
        return hidden, encoder

    def _split(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        metadata = self._fbc._metadata
        if not isinstance(output, tuple):
            return output, None
        encoder = None
        if metadata.return_encoder_hidden_states_index is not None:
            encoder = output[metadata.return_encoder_hidden_states_index]
        return output[metadata.return_hidden_states_index], encoder

    def _as_output(
        self, hidden: torch.Tensor, encoder: torch.Tensor | None, like: Any = None
    ) -> Any:
        """The block's output structure around the two streams."""
        metadata = self._fbc._metadata
        if metadata.return_encoder_hidden_states_index is None and not isinstance(like, tuple):
            return hidden
        size = len(like) if isinstance(like, tuple) else 2
        output: list[Any] = [None] * size
        output[metadata.return_hidden_states_index] = hidden
        if metadata.return_encoder_hidden_states_index is not None:
            output[metadata.return_encoder_hidden_states_index] = encoder
        return tuple(output)

    def _bind(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by name (the block's own signature)."""
        if self._names is None:
            parameters = inspect.signature(type(module).forward).parameters
            self._names = list(parameters)[1:]  # past `self`
        bound = dict(zip(self._names, args, strict=False))
        bound.update(kwargs)
        return bound


def _groups(
    images: list[ImageResiduals], device: torch.device
) -> list[tuple[ImageResiduals, torch.Tensor, list[int]]]:
    """Each image of the forward with its rows (on the device, and on the host), in order
    of first row."""
    rows: dict[int, tuple[ImageResiduals, list[int]]] = {}
    for row, image in enumerate(images):
        rows.setdefault(id(image), (image, []))[1].append(row)
    return [
        (image, torch.tensor(indices, device=device), indices) for image, indices in rows.values()
    ]


def _rows_of(value: Any, rows: torch.Tensor, total: int) -> Any:
    """`value`'s rows at `rows` where it has one per row of the forward (tensors, and
    tuples or lists of them); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == total:
        return value.index_select(0, rows)
    if isinstance(value, tuple | list):
        return type(value)(_rows_of(item, rows, total) for item in value)
    return value
