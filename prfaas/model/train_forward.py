"""A training forward for our model: the serving modules and weights, unchanged, on a batch of
equal-length rows, differentiable end to end.

The model is called as the executor calls it, with a ForwardMeta of one sequence per row and
fresh caches, with `differentiable=True`: full-attention layers run their serving code (their
ops are out-of-place up to the cache writes, which autograd follows), and the linear layers'
conv and delta rule, whose serving forms work in place and have no backward, take the batched
forms of `ops/delta_rule_train.py` from a zero state instead. The projections, gates, norms and
MLPs around them are the serving modules' own code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prfaas.model.base import ForwardMeta, LayerCache
from prfaas.model.hybrid import HybridForCausalLM
from prfaas.model.linear_mixing import HeadsFn
from prfaas.model.ops.delta_rule import l2norm
from prfaas.model.ops.delta_rule_train import causal_conv_silu, chunk_delta_rule_train


def training_meta(batch: int, length: int, device: torch.device | str = "cpu") -> ForwardMeta:
    """`batch` sequences of `length` new tokens each, sequence i in block i (block size = length)."""
    return ForwardMeta(
        positions=torch.arange(length, device=device).repeat(batch),
        query_lens=[length] * batch,
        context_lens=[length] * batch,
        block_tables=[torch.tensor([i], device=device) for i in range(batch)],
        slot_mapping=torch.arange(batch * length, device=device),
        state_slots=list(range(batch)),
        differentiable=True,
    )


@dataclass
class _Pool:
    """A training row's full-attention pool (the serving pools are the KV layout's, which the
    model may not import): GQA k and v, or MLA's latent in k."""

    k: torch.Tensor
    v: torch.Tensor | None = None


@dataclass
class _NoState:
    """The linear layers' placeholder: the differentiable path keeps no state."""

    recurrent: torch.Tensor
    conv: torch.Tensor


def fresh_caches(model: HybridForCausalLM, batch: int, length: int) -> list[LayerCache]:
    """Full-attention pools of one block per row; the linear layers get empty placeholders (the
    differentiable path reads and writes no state)."""
    cfg = model.config
    p = next(model.parameters())
    out: list[LayerCache] = []
    for kind in cfg.layer_types:
        if kind == "linear":
            out.append(_NoState(p.new_empty(0), p.new_empty(0)))
        elif cfg.full.kind == "mla":
            latent = cfg.full.kv_lora_rank + cfg.full.qk_rope_head_dim
            out.append(_Pool(p.new_zeros(batch, length, latent)))
        else:
            shape = (batch, length, cfg.full.num_kv_heads, cfg.full.head_dim)
            out.append(_Pool(p.new_zeros(shape), p.new_zeros(shape)))
    return out


def batch_logits(model: HybridForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """ids (B, L) -> logits (B, L, vocab) float32, each row a sequence of its own from position 0."""
    b, n = ids.shape
    meta = training_meta(b, n, ids.device)
    logits = model(ids.reshape(-1), meta, fresh_caches(model, b, n))
    return logits.view(b, n, -1)


def lm_loss(model: HybridForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ids (B, L): L - 1 predictions per row."""
    logits = batch_logits(model, ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def conv_delta_rule_train(
    mixed: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    conv_weight: torch.Tensor,
    scale: float,
    heads: HeadsFn,
    meta: ForwardMeta,
) -> torch.Tensor:
    """`linear_mixing.conv_delta_rule` for a ForwardMeta with `differentiable` set: the same
    arguments and result (T, H, V), every sequence from a zero conv and recurrent state."""
    b, n = len(meta.query_lens), meta.query_lens[0]
    if any(q != n for q in meta.query_lens) or meta.context_lens != meta.query_lens:
        raise ValueError("the differentiable path takes sequences of one length with nothing cached")
    y = causal_conv_silu(mixed.view(b, n, -1), conv_weight)  # (B, L, C) float32
    q, k, v = heads(y)  # (B, L, Hk, K), (B, L, Hk, K), (B, L, H, V)
    r = v.shape[2] // q.shape[2]
    q, k = (l2norm(x).repeat_interleave(r, dim=2) if r > 1 else l2norm(x) for x in (q, k))
    lead = (b, n, v.shape[2])
    o = chunk_delta_rule_train(q, k, v, g.view(*lead, *g.shape[2:]), beta.view(lead), scale)
    return o.reshape(b * n, *o.shape[2:]).to(mixed.dtype)
