"""The part of a linear-attention layer both families share: the short causal conv over the
mixed q/k/v channels, L2-normalised q and k, then the gated delta rule, from and back into each
sequence's state slot.

Decode (one token per sequence) runs every sequence at once on the gathered slots; prefill runs
each sequence's tokens with the chunked form, continuing from its slot (so a chunked prefill or an
imported state carries on exactly). Prefill stays in token-major layout from the projection to
the delta rule: the conv reads the projection's columns in place, and the normalisation is folded
into the delta rule's first copy of q and k."""

from __future__ import annotations

from collections.abc import Callable

import torch

from prfaas.model.base import ForwardMeta, LinearStateCache
from prfaas.model.ops import cpu_kernel
from prfaas.model.ops.conv import causal_conv1d_step, causal_conv1d_tokens, conv_state_after
from prfaas.model.ops.delta_rule import chunk_delta_rule, recurrent_delta_step

HeadsFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def conv_delta_rule(
    mixed: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    conv_weight: torch.Tensor,
    scale: float,
    heads: HeadsFn,
    meta: ForwardMeta,
    cache: LinearStateCache,
) -> torch.Tensor:
    """mixed (T, C) q/k/v channels before the conv; g (T, H) or (T, H, K) log decay; beta (T, H);
    conv_weight (C, W); `heads` splits conv output (..., C) into q, k (..., Hk, K) and v (..., H, V)
    (views; Hk divides H, value head h reading key head h // (H / Hk)). Returns the delta-rule
    output (T, H, V) in mixed's dtype."""
    if meta.differentiable:
        from prfaas.model.train_forward import conv_delta_rule_train

        return conv_delta_rule_train(mixed, g, beta, conv_weight, scale, heads, meta)
    kernel = mixed.device.type == "cpu" and cpu_kernel.available()
    if meta.is_decode:
        return _decode(mixed, g, beta, conv_weight, scale, heads, meta, cache, kernel)
    outs = []
    for i, (s, e) in enumerate(meta.seq_ranges()):
        slot = meta.state_slots[i]
        y, new_conv = causal_conv1d_tokens(mixed[s:e], conv_weight, cache.conv[slot])  # (L, C) float32
        q, k, v = heads(y)  # (L, Hk | H, K | V), views of y
        snaps = meta.snapshots[i] if meta.snapshots else ()
        parts, a = [], 0
        for b, snap in (*snaps, (e - s, None)):  # the delta rule up to each snapshot, then on to the end
            if b > a:  # (a snapshot at the end has nothing after it)
                parts.append(_delta_rule(q[a:b], k[a:b], v[a:b], g[s + a : s + b], beta[s + a : s + b], scale,
                                         cache.recurrent, slot, kernel))
            if snap is not None:  # the states as they stand after b tokens: a checkpoint's
                cache.recurrent[snap].copy_(cache.recurrent[slot])
                cache.conv[snap].copy_(conv_state_after(mixed[s : s + b], cache.conv[slot], conv_weight.shape[-1]))
            a = b
        cache.conv[slot].copy_(new_conv)
        o_i = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        outs.append(o_i.to(mixed.dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # (T, H, V)


def _delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                scale: float, recurrent: torch.Tensor, slot: int, kernel: bool) -> torch.Tensor:
    """The prefill delta rule of one sequence's tokens, continuing from and back into its slot."""
    if kernel:  # the recurrent form in our C kernel, on the slot's state in place
        return cpu_kernel.delta_rule(q, k, v, g, beta, scale, recurrent[slot], l2norm_qk=True)
    o, state = chunk_delta_rule(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), g.unsqueeze(0), beta.unsqueeze(0), scale,
        initial_state=recurrent[slot : slot + 1], l2norm_qk=True,
    )
    recurrent[slot].copy_(state[0])
    return o[0]


def _decode(
    mixed: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    conv_weight: torch.Tensor,
    scale: float,
    heads: HeadsFn,
    meta: ForwardMeta,
    cache: LinearStateCache,
    kernel: bool,
) -> torch.Tensor:
    """One token per sequence, every sequence at once. When the slots form one run (the executor
    orders a batch by slot) the states are views, updated in place; otherwise they are gathered
    and scattered, except that the C kernel updates recurrent states at their slots directly."""
    slots = meta.state_slots
    first, n = slots[0], len(slots)
    index: torch.Tensor | None = None
    if slots == list(range(first, first + n)):
        conv_state = cache.conv[first : first + n]
    else:
        index = torch.tensor(slots, dtype=torch.long, device=mixed.device)
        conv_state = cache.conv.index_select(0, index)  # (B, C, W-1)
    y = causal_conv1d_step(mixed, conv_weight, conv_state)  # (B, C)
    q, k, v = heads(y)
    if kernel:
        o = cpu_kernel.delta_rule_decode(q, k, v, g, beta, scale, cache.recurrent, slots, l2norm_qk=True)
    else:
        state = cache.recurrent[first : first + n] if index is None else cache.recurrent.index_select(0, index)
        o = recurrent_delta_step(q, k, v, g, beta, state, scale, l2norm_qk=True)  # updates state
        if index is not None:
            cache.recurrent.index_copy_(0, index, state)
    if index is not None:
        cache.conv.index_copy_(0, index, conv_state)
    return o.to(mixed.dtype)  # (B, H, V)
