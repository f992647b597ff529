"""Qwen3-Next: Gated DeltaNet linear attention, gated GQA full attention, dense or MoE MLP.

Parameter names follow the Hugging Face checkpoints (`linear_attn.in_proj_qkvz`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prfaas.model.base import ForwardMeta, FullAttnCache, LinearStateCache
from prfaas.model.config import ModelConfig
from prfaas.model.hybrid import FamilyParts
from prfaas.model.layers import MLP, Experts, GatedRMSNorm, RMSNorm, apply_rotary, rotary_cos_sin
from prfaas.model.linear_mixing import conv_delta_rule
from prfaas.model.ops.attention import gather_context, store_tokens


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


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
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim))  # (T, Hkv, D)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        cos, sin = rotary_cos_sin(meta.positions, self.rotary_dim, self.rope_theta, x.dtype)
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

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Projections in the checkpoint's head-grouped order -> mixed_qkv (T, conv_dim),
        z (T, Hv, dv), b and a (T, Hv)."""
        t, r = x.shape[0], self.nv // self.nk
        qkvz = self.in_proj_qkvz(x).view(t, self.nk, 2 * self.dk + 2 * r * self.dv)
        q, k, v, z = torch.split(qkvz, [self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
        ba = self.in_proj_ba(x).view(t, self.nk, 2 * r)
        b, a = torch.split(ba, [r, r], dim=-1)
        mixed = torch.cat((q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)), dim=-1)
        return mixed, z.reshape(t, self.nv, self.dv), b.reshape(t, self.nv), a.reshape(t, self.nv)

    def _qkv_heads(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., conv_dim) -> q, k (..., Hv, dk) L2-normalised in float32 and expanded to the value
        heads, v (..., Hv, dv)."""
        q, k, v = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        lead = mixed.shape[:-1]
        r = self.nv // self.nk
        q = l2norm(q.reshape(*lead, self.nk, self.dk).float()).repeat_interleave(r, dim=-2)
        k = l2norm(k.reshape(*lead, self.nk, self.dk).float()).repeat_interleave(r, dim=-2)
        return q, k, v.reshape(*lead, self.nv, self.dv)

    def forward(self, x: torch.Tensor, meta: ForwardMeta, cache: LinearStateCache) -> torch.Tensor:
        mixed, z, b, a = self._split(x)
        beta = torch.sigmoid(b)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # (T, Hv), log decay
        weight = self.conv1d.weight.squeeze(1)  # (C, W)
        scale = self.dk**-0.5
        o = conv_delta_rule(mixed, g, beta, weight, scale, self._qkv_heads, meta, cache)
        o = self.norm(o.to(x.dtype), z)
        return self.out_proj(o.reshape(x.shape[0], -1))


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


PARTS = FamilyParts(mixer=_mixer, mlp=_mlp, zero_centered_norm=True)
