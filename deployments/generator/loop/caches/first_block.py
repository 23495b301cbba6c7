"""First-Block-Cache per image in the loop: each image decides at its own step, on its own
residuals, whether the blocks past the first run for it.

diffusers' First-Block-Cache runs the first transformer block, compares its residual
(output minus input) with the one of the last step that ran every block, and when the
relative change `mean|r - r_prev| / mean|r_prev|` is at most the threshold, skips the other
blocks: their output is the first block's plus the residual they added at that step. It
decides once for a call's batch. Here each image keeps its residuals (`ImageResiduals`, in
its `ImageState.caches`) and decides on its own rows (its conditional and unconditional ones
together, as its request alone decides on a batch of one); the blocks past the first run
only over the rows of the images that compute.

A hook of ours on every block diffusers' cache hooked, outside diffusers' hook: in a
request-level call it passes the call on unchanged; in a loop forward it goes past it to the
block. The first block runs every row and decides; the skipping images get their cached
residuals at once; each later block runs only the computing rows (`loop_rows.Narrowing`) and
leaves the other rows as they came; the last block stores each computing image's new
residuals. The forward around the blocks (embeddings, the final norm and projection) sees
every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import ModelHook

from deployments.generator.loop.caches.loop_rows import LoopForward, Narrowing, current

_HOOK = "image_service_per_image_first_block"


@dataclass(eq=False)
class ImageResiduals:
    """One image's First-Block-Cache: its first block's residual and what the other blocks
    added to each stream, at the last step that ran every block (None before its first)."""

    head: torch.Tensor | None = None
    tail: tuple[torch.Tensor, torch.Tensor | None] | None = None


@dataclass
class _Decisions:
    """What the first block decided in one forward, for the blocks after it."""

    # The images that run every block, with their rows; their rows together, on both sides.
    computing_images: list[tuple[ImageResiduals, torch.Tensor]] = field(default_factory=list)
    computing: torch.Tensor | None = None
    computing_rows: list[int] = field(default_factory=list)
    everyone: bool = True  # every row computes (the blocks run unnarrowed)
    head_output: tuple[torch.Tensor, torch.Tensor | None] | None = None


def install(denoiser: torch.nn.Module, threshold: float) -> int:
    """Hook the per-image cache onto the blocks diffusers' First-Block-Cache hooked (call it
    right after diffusers' `apply_first_block_cache`); the number of blocks hooked."""
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
    key = object()  # the cache's key in each image's states, and in a forward's
    for block in blocks:
        registry = HookRegistry.check_if_exists_or_initialize(block)
        head = registry.get_hook(_FBC_LEADER_BLOCK_HOOK)
        fbc = head or registry.get_hook(_FBC_BLOCK_HOOK)
        # diffusers' roles: the head decides, the tail stores what the blocks added.
        role = "head" if head is not None else "tail" if fbc.is_tail else "middle"
        registry.register_hook(_BlockHook(key, threshold, fbc, role, block), _HOOK)
    return len(blocks)


class _BlockHook(ModelHook):
    """On one block: diffusers' hook in request-level calls, the per-image cache in the
    loop's forwards."""

    _is_stateful = False  # the state lives on the images

    def __init__(
        self, key: object, threshold: float, fbc: ModelHook, role: str, block: torch.nn.Module
    ) -> None:
        super().__init__()
        self._key = key
        self._threshold = threshold
        self._fbc = fbc  # diffusers' hook on this block, and its block metadata
        self._role = role
        metadata = fbc._metadata
        self._narrowing = Narrowing(
            block,
            also=(
                metadata.hidden_states_argument_name,
                metadata.encoder_hidden_states_argument_name,
            ),
        )

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = current()
        if forward is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        block = self._fbc.fn_ref.original_forward  # past diffusers' hook
        if self._role == "head":
            return self._head(forward, block, args, kwargs)
        decided: _Decisions = forward.state[self._key]
        if decided.everyone:
            output = block(*args, **kwargs)
        elif decided.computing is None:  # every image skips: the rows pass as they came
            output = self._as_output(*self._streams(args, kwargs))
        else:
            output = self._narrowed(forward, decided, block, args, kwargs)
        if self._role == "tail":
            self._store(decided, output)
        return output

    def _head(self, forward: LoopForward, block: Any, args: tuple, kwargs: dict) -> Any:
        hidden_in, _ = self._streams(args, kwargs)
        output = block(*args, **kwargs)
        hidden, encoder = self._split(output)
        residual = hidden - hidden_in
        decided = forward.state[self._key] = _Decisions()
        skipping: list[tuple[ImageResiduals, torch.Tensor]] = []
        for caches, rows, indices in forward.groups(hidden.device):
            image = caches.setdefault(self._key, ImageResiduals())
            forward.keep(_restorer(image))
            mine = residual.index_select(0, rows)
            if self._changed(image, mine):
                image.head = mine
                decided.computing_images.append((image, rows))
                decided.computing_rows.extend(indices)
            else:
                skipping.append((image, rows))
        decided.everyone = not skipping
        if decided.computing_images:
            decided.computing = torch.cat([rows for _, rows in decided.computing_images])
        decided.head_output = (hidden, encoder)
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
        return change.item() > self._threshold

    def _narrowed(
        self, forward: LoopForward, decided: _Decisions, block: Any, args: tuple, kwargs: dict
    ) -> Any:
        """The block over the computing rows; the others as they came."""
        rows = decided.computing
        hidden_in, encoder_in = self._streams(args, kwargs)
        output = self._narrowing.call(
            block, args, kwargs, rows, decided.computing_rows, len(forward.rows)
        )
        hidden_part, encoder_part = self._split(output)
        hidden = hidden_in.index_copy(0, rows, hidden_part)
        encoder = None
        if encoder_part is not None and encoder_in is not None:
            encoder = encoder_in.index_copy(0, rows, encoder_part)
        return self._as_output(hidden, encoder, like=output)

    def _store(self, decided: _Decisions, output: Any) -> None:
        """Each computing image's residuals: what the blocks past the first added."""
        hidden, encoder = self._split(output)
        head_hidden, head_encoder = decided.head_output
        for image, rows in decided.computing_images:
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


def _restorer(image: ImageResiduals):
    head, tail = image.head, image.tail  # replaced by a step, never changed in place

    def restore() -> None:
        image.head, image.tail = head, tail

    return restore
