"""Attention that context parallelism can split: where diffusers' own falls short.

Context parallelism (Ulysses, ring) replaces the attention op itself: diffusers routes a
processor's attention through `dispatch_attention_fn`, which sees the processor's
`_parallel_config` and exchanges the sequence shards between ranks. Two gaps remain in
diffusers 0.42, both checked on this project's tiny models:

- SD3's stock `JointAttnProcessor2_0` calls `F.scaled_dot_product_attention` directly. Given a
  plan, each rank then attends to its own slice of the sequence only, and the image is
  silently wrong (a max difference of 3.8e-2 on tiny SD3). `DispatchedJointAttnProcessor` is
  the same computation routed through the dispatcher.
- Ring attention needs an op that also returns the log-sum-exp of each row. The `native`
  backend cannot, and `_native_flash` calls `aten::_scaled_dot_product_flash_attention`,
  which has no CPU kernel. `cpu_ring_attention` gives `_native_flash` the CPU flash kernel
  (`aten::_scaled_dot_product_flash_attention_for_cpu`, which returns it) for CPU tensors;
  tensors on an accelerator keep diffusers' own op.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models import attention_dispatch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

# The backend ring attention uses unless a model sets its own (`optimizations.attention_backend`).
RING_BACKEND = AttentionBackendName._NATIVE_FLASH


class DispatchedJointAttnProcessor:
    """SD3's joint attention (image and prompt tokens attend together), computed through
    diffusers' attention dispatcher so that context parallelism can split it. The math is
    `JointAttnProcessor2_0`'s; the layout is the dispatcher's (batch, sequence, heads, dim)."""

    # Set by `ModelMixin.set_attention_backend` and `enable_parallelism`.
    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        image_tokens = hidden_states.shape[1]
        query, key, value = _heads(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v)
        query, key = _normed(query, attn.norm_q), _normed(key, attn.norm_k)
        if encoder_hidden_states is not None:
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            context_query, context_key, context_value = _heads(
                attn, encoder_hidden_states, *projections
            )
            context_query = _normed(context_query, attn.norm_added_q)
            context_key = _normed(context_key, attn.norm_added_k)
            # The prompt's tokens follow the image's, as in diffusers' processor.
            query = torch.cat([query, context_query], dim=1)
            key = torch.cat([key, context_key], dim=1)
            value = torch.cat([value, context_value], dim=1)
        attended = dispatch_attention_fn(
            query,
            key,
            value,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        attended = attended.flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](attended[:, :image_tokens]))
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states = attended[:, image_tokens:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def _heads(attn, states: torch.Tensor, *projections) -> list[torch.Tensor]:
    """Each projection of `states`, split into (batch, sequence, heads, dim)."""
    return [projection(states).unflatten(-1, (attn.heads, -1)) for projection in projections]


def _normed(states: torch.Tensor, norm) -> torch.Tensor:
    return states if norm is None else norm(states)


def use_dispatched_joint_attention(denoiser: torch.nn.Module) -> int:
    """Give every joint-attention module of `denoiser` (SD3's) the dispatched processor;
    returns how many it changed."""
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    changed = 0
    for module in denoiser.modules():
        if isinstance(module, Attention) and isinstance(module.processor, JointAttnProcessor2_0):
            module.set_processor(DispatchedJointAttnProcessor())
            changed += 1
    return changed


def _cpu_flash_forward(
    ctx,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _save_ctx: bool = True,
    _parallel_config=None,
):
    """`_native_flash`'s forward op for CPU tensors: the same contract (inputs and outputs in
    (batch, sequence, heads, dim), the log-sum-exp in (batch, sequence, heads)) on the CPU
    flash kernel. Inference only: nothing is saved for a backward pass."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
    )
    out = out.transpose(1, 2).contiguous()
    lse = lse.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out


def cpu_ring_attention() -> None:
    """Let `_native_flash` run ring attention on CPU tensors (see the module's docstring).
    Idempotent; called once per process before its denoiser serves."""
    forward = attention_dispatch._native_flash_attention_forward_op
    if getattr(forward, "_cpu_capable", False):
        return

    @functools.wraps(forward)
    def either_device(ctx, query, *args, **kwargs):
        if query.device.type == "cpu":
            return _cpu_flash_forward(ctx, query, *args, **kwargs)
        return forward(ctx, query, *args, **kwargs)

    either_device._cpu_capable = True
    attention_dispatch._native_flash_attention_forward_op = either_device
