"""Qwen3-Next: Gated DeltaNet linear attention, gated GQA full attention, dense or MoE MLP.

Parameter names follow the Hugging Face checkpoints (`linear_attn.in_proj_qkvz`, ...). Two of
them are held in another row order than the checkpoint's: the checkpoint groups the rows of
`in_proj_qkvz` by key head ([q_h, k_h, v_h, z_h] for each h) and `in_proj_ba` likewise; we keep
[all q, all k, all v, all z] and [all b, all a], so that the projection's output splits into
views (q|k|v is the conv input as it is) instead of being regathered on every forward.
`from_checkpoint` / `to_checkpoint` convert at load and save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prfaas.model.base import ForwardMeta, FullAttnCache, LinearStateCache
from prfaas.model.config import ModelConfig
from prfaas.model.hybrid import FamilyParts
from prfaas.model.layers import MLP, Experts, GatedRMSNorm, RMSNorm, apply_rotary
from prfaas.model.linear_mixing import conv_delta_rule
from prfaas.model.ops.attention import gather_context, store_tokens


class GatedAttention(nn.Module):
    """GQA with q/k RMSNorm, partial rotary and a sigmoid output gate."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        spec = cfg.full
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.rotary_dim, self.rope_theta = spec.rotary_dim, spec.rope_theta
        self.scale = self.head_dim**-0.5
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim * 2, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, zero_centered=True)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, zero_centered=True)

    def forward(self, x: torch.Tensor, meta: ForwardMeta, cache: FullAttnCache) -> torch.Tensor:
        t = x.shape[0]
        q, gate = self.q_proj(x).view(t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)  # (T, H, D) each
        q = self.q_norm(q)  # new tensors: rotated in place below
        k = self.k_norm(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim))  # (T, Hkv, D)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        cos, sin = meta.rotary(self.rotary_dim, self.rope_theta, x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        assert cache.v is not None
        store_tokens(cache.k, meta.slot_mapping, k)
        store_tokens(cache.v, meta.slot_mapping, v)
        if meta.is_decode:  # one token per sequence: all sequences in one paged call
            out = meta.attn.decode(q, cache.k, cache.v, meta.padded_block_tables, meta.context_lens_tensor, self.scale)
        else:
            out = torch.empty_like(q)
            for i, (s, e) in enumerate(meta.seq_ranges()):
                n = meta.context_lens[i]
                if n == e - s:  # no cached prefix: the context is these tokens, no need to gather it
                    k_ctx, v_ctx = k[s:e], v[s:e]
                else:
                    k_ctx = gather_context(cache.k, meta.block_tables[i], n)
                    v_ctx = gather_context(cache.v, meta.block_tables[i], n)
                out[s:e] = meta.attn.attend(q[s:e], k_ctx, v_ctx, self.scale)
        out = out.reshape(t, -1) * torch.sigmoid(gate.reshape(t, -1))
        return self.o_proj(out)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet: short causal conv over q/k/v, a per-head scalar decay, the delta rule."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        spec = cfg.linear
        self.nk, self.nv, self.dk, self.dv = spec.num_k_heads, spec.num_v_heads, spec.head_k_dim, spec.head_v_dim
        self.key_dim, self.value_dim = spec.key_dim, spec.value_dim
        self.conv_dim, self.kernel = spec.conv_dim, spec.conv_kernel
        d = cfg.hidden_size
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.in_proj_qkvz = nn.Linear(d, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(d, 2 * self.nv, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.nv))
        self.A_log = nn.Parameter(torch.zeros(self.nv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps, activation="silu")
        self.out_proj = nn.Linear(self.value_dim, d, bias=False)

    def _heads(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """conv output (..., conv_dim) -> q, k (..., Hk, dk), v (..., Hv, dv): views."""
        q, k, v = torch.split(y, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        lead = y.shape[:-1]
        return q.view(*lead, self.nk, self.dk), k.view(*lead, self.nk, self.dk), v.view(*lead, self.nv, self.dv)

    def forward(self, x: torch.Tensor, meta: ForwardMeta, cache: LinearStateCache) -> torch.Tensor:
        t = x.shape[0]
        qkvz = self.in_proj_qkvz(x)  # (T, conv_dim + value_dim): q | k | v | z, see the module doc
        mixed, z = qkvz[:, : self.conv_dim], qkvz[:, self.conv_dim :].view(t, self.nv, self.dv)
        ba = self.in_proj_ba(x)
        b, a = ba[:, : self.nv], ba[:, self.nv :]
        beta = torch.sigmoid(b)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # (T, Hv), log decay
        weight = self.conv1d.weight.squeeze(1)  # (C, W)
        scale = self.dk**-0.5
        o = conv_delta_rule(mixed, g, beta, weight, scale, self._heads, meta, cache)
        o = self.norm(o, z)
        return self.out_proj(o.reshape(t, -1))


_GROUPED_ROWS = (".linear_attn.in_proj_qkvz.weight", ".linear_attn.in_proj_ba.weight")


def _group_sizes(cfg: ModelConfig, name: str) -> list[int]:
    """Rows per key head of each part of a grouped projection, in checkpoint order."""
    spec = cfg.linear
    r = spec.num_v_heads // spec.num_k_heads
    if name.endswith(_GROUPED_ROWS[0]):
        return [spec.head_k_dim, spec.head_k_dim, r * spec.head_v_dim, r * spec.head_v_dim]
    return [r, r]


def from_checkpoint(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """Checkpoint rows grouped by key head -> ours, grouped by part (see the module doc)."""
    if not name.endswith(_GROUPED_ROWS) or t.dim() != 2:
        return t
    sizes = _group_sizes(cfg, name)
    if t.shape[0] != cfg.linear.num_k_heads * sum(sizes):
        return t  # the loader's shape check names the tensor
    parts = t.view(cfg.linear.num_k_heads, sum(sizes), -1).split(sizes, dim=1)
    return torch.cat([p.reshape(-1, t.shape[1]) for p in parts])


def to_checkpoint(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of `from_checkpoint`."""
    if not name.endswith(_GROUPED_ROWS) or t.dim() != 2:
        return t
    sizes, nk = _group_sizes(cfg, name), cfg.linear.num_k_heads
    parts = t.split([nk * n for n in sizes])
    return torch.cat([p.view(nk, n, -1) for p, n in zip(parts, sizes, strict=True)], dim=1).reshape(t.shape)


class SparseMoe(nn.Module):
    """Softmax top-k router over the experts, plus a sigmoid-gated shared expert."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.top_k, self.norm_topk = moe.top_k, moe.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, cfg.hidden_size, moe.intermediate_size)
        self.shared_expert = MLP(cfg.hidden_size, moe.shared_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        out = self.experts(x, top_idx, top_w.to(logits.dtype))
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def _mixer(cfg: ModelConfig, layer: int) -> tuple[str, nn.Module]:
    if cfg.layer_types[layer] == "linear":
        return "linear_attn", GatedDeltaNet(cfg)
    return "self_attn", GatedAttention(cfg)


def _mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    if cfg.mlp_types[layer] == "moe":
        return SparseMoe(cfg)
    return MLP(cfg.hidden_size, cfg.intermediate_size)


PARTS = FamilyParts(
    mixer=_mixer, mlp=_mlp, zero_centered_norm=True, from_checkpoint=from_checkpoint, to_checkpoint=to_checkpoint
)
