"""Per-module plan builders: each fills one layer struct's fields for its token mixer or MLP (the
fused projections, prepared norms, sizes) from the torch module, which stays the reference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from prfaas.model.fast_decode import library as lib
from prfaas.model.kimi_linear import KimiDeltaAttention, KimiMLA, KimiMoE
from prfaas.model.layers import MLP, Experts
from prfaas.model.qwen3_next import GatedAttention, GatedDeltaNet, SparseMoe

if TYPE_CHECKING:
    from prfaas.model.fast_decode.plan import Plan


def _limit(ok: bool, what: str) -> None:
    from prfaas.model.fast_decode.plan import Unsupported

    if not ok:
        raise Unsupported(what)


def _cat(*ws: torch.Tensor) -> torch.Tensor:
    return torch.cat([w.detach() for w in ws])


def gdn(p: Plan, L: lib.Layer, m: GatedDeltaNet, cache: Any) -> None:
    """in_proj = qkvz | ba (our row order: q, k, v, z, b, a); conv, decay and the gated norm."""
    _limit(max(m.dk, m.dv) <= 512 and m.kernel <= 16, "linear head dim or conv kernel")
    L.mixer = lib.MIX_GDN
    L.in_proj = p.lin(_cat(m.in_proj_qkvz.weight, m.in_proj_ba.weight))
    L.out_proj = p.lin(m.out_proj.weight)
    L.conv_w = p.f32(m.conv1d.weight.squeeze(1))
    L.A = p.f32(-m.A_log.float().exp())
    L.dt_bias = p.f32(m.dt_bias)
    L.head_norm_a = p.f32(m.norm.weight)
    L.nk, L.nv, L.dk, L.dv, L.conv_dim, L.conv_len = m.nk, m.nv, m.dk, m.dv, m.conv_dim, m.kernel
    L.scale, L.mixer_eps = m.dk**-0.5, m.norm.eps
    p.widths += [m.conv_dim, 2 * m.nv, m.nv * m.dv]
    p.linear_state(L, cache)


def kda(p: Plan, L: lib.Layer, m: KimiDeltaAttention, cache: Any) -> None:
    """in_proj = q | k | v | f_a | b | g_a; f_b and g_b as the second products."""
    h, d = m.num_heads, m.head_dim
    _limit(d <= 512 and m.kernel <= 16, "linear head dim or conv kernel")
    L.mixer = lib.MIX_KDA
    L.in_proj = p.lin(_cat(m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.f_a_proj.weight, m.b_proj.weight,
                           m.g_a_proj.weight))
    L.second_a, L.second_b = p.lin(m.f_b_proj.weight), p.lin(m.g_b_proj.weight)
    L.out_proj = p.lin(m.o_proj.weight)
    L.conv_w = p.f32(m.conv_weight())
    L.A = p.f32(-m.A_log.float().view(h).exp())
    L.dt_bias = p.f32(m.dt_bias)
    L.head_norm_a = p.f32(m.o_norm.weight)
    L.nk = L.nv = h
    L.dk = L.dv = d
    L.conv_dim, L.conv_len = 3 * h * d, m.kernel
    L.scale, L.mixer_eps = d**-0.5, m.o_norm.eps
    p.widths += [3 * h * d, 2 * h * d, h * d + h]
    p.linear_state(L, cache)


def gqa(p: Plan, L: lib.Layer, m: GatedAttention, cache: Any) -> None:
    """in_proj = q (with its gate, per head) | k | v; q / k norms zero-centred."""
    _limit(m.head_dim <= 1024 and m.rotary_dim <= 512, "head dim or rotary dim")
    _limit(m.q_norm.zero_centered and m.k_norm.zero_centered, "q / k norms not zero-centred")
    L.mixer = lib.MIX_GQA
    L.in_proj = p.lin(_cat(m.q_proj.weight, m.k_proj.weight, m.v_proj.weight))
    L.out_proj = p.lin(m.o_proj.weight)
    L.head_norm_a = p.f32(1.0 + m.q_norm.weight.float())
    L.head_norm_b = p.f32(1.0 + m.k_norm.weight.float())
    L.nh, L.nkv, L.hd, L.rot, L.theta = m.num_heads, m.num_kv_heads, m.head_dim, m.rotary_dim, m.rope_theta
    L.scale, L.mixer_eps = m.scale, m.q_norm.eps
    p.widths.append(m.num_heads * m.head_dim)
    p.heads = max(p.heads, m.num_heads)
    p.paged(L, cache)


def mla(p: Plan, L: lib.Layer, m: KimiMLA, cache: Any) -> None:
    """in_proj = q (or q_a) | kv_a, biases where the checkpoint has them; W_UK^T and W_UV per head."""
    h, r, rope = m.num_heads, m.rank, m.rope
    _limit(h <= 64 and r + rope <= 1024, "MLA heads or latent size")
    first = m.q_proj if m.q_lora_rank is None else m.q_a_proj
    kv_a = m.kv_a_proj_with_mqa
    bias = None
    if first.bias is not None or kv_a.bias is not None:
        parts = (first, kv_a)
        bias = torch.cat([torch.zeros(x.weight.shape[0]) if x.bias is None else x.bias.detach().float() for x in parts])
    L.mixer = lib.MIX_MLA
    L.in_proj = p.lin(_cat(first.weight, kv_a.weight), bias)
    if m.q_lora_rank is not None:
        L.second_a = p.lin(m.q_b_proj.weight)
        L.head_norm_a = p.f32(m.q_a_layernorm.weight)
    w_uk, w_uv = m._up_weights()  # (H, nope, R), (H, v, R)
    L.heads_a = p.lins([w_uk[i].t() for i in range(h)])
    L.heads_b = p.lins([w_uv[i] for i in range(h)])
    L.head_norm_b = p.f32(m.kv_a_layernorm.weight)
    L.out_proj = p.lin(m.o_proj.weight, m.o_proj.bias)
    L.nh, L.rank, L.nope, L.rope, L.vdim, L.q_lora = h, r, m.nope, rope, m.v_dim, m.q_lora_rank or 0
    L.scale, L.mixer_eps = m.scale, m.kv_a_layernorm.eps
    p.widths += [h * (r + rope), h * r, h * m.v_dim, h * m.qk_dim]
    p.heads = max(p.heads, h)
    p.paged(L, cache)


def dense(p: Plan, L: lib.Layer, m: MLP) -> None:
    L.mlp = lib.MLP_DENSE
    L.mlp_in = p.lin(_cat(m.gate_proj.weight, m.up_proj.weight))
    L.mlp_down = p.lin(m.down_proj.weight)
    L.inter = m.gate_proj.weight.shape[0]


def _experts(p: Plan, L: lib.Layer, experts: Experts, top_k: int, hidden: int) -> None:
    projs = [experts._projs(i) for i in range(len(experts))]
    _limit(len(projs) <= 512, "number of experts")
    L.experts_gu = p.lins([_cat(g.weight, u.weight) for g, u, _ in projs])
    L.experts_down = p.lins([d.weight for _, _, d in projs])
    inter = projs[0][0].weight.shape[0]
    L.E, L.topk, L.inter = len(projs), top_k, inter
    p.moe_cols = max(p.moe_cols, hidden, 2 * inter)
    p.topk, p.experts = max(p.topk, top_k), max(p.experts, len(projs))


def moe_softmax(p: Plan, L: lib.Layer, m: SparseMoe) -> None:
    """mlp_in = router | shared expert gate | shared gate | shared up."""
    s = m.shared_expert
    L.mlp = lib.MLP_MOE_SOFTMAX
    L.mlp_in = p.lin(_cat(m.gate.weight, m.shared_expert_gate.weight, s.gate_proj.weight, s.up_proj.weight))
    L.mlp_down = p.lin(s.down_proj.weight)
    L.shared_inter, L.norm_topk, L.has_shared_gate = s.gate_proj.weight.shape[0], int(m.norm_topk), 1
    _experts(p, L, m.experts, m.top_k, m.gate.weight.shape[1])


def moe_sigmoid(p: Plan, L: lib.Layer, m: KimiMoE) -> None:
    """mlp_in = shared gate | shared up; the router in float32, as the reference runs it."""
    s, g = m.shared_experts, m.gate
    _limit(g.num_groups <= 512 and g.num_experts % g.num_groups == 0, "expert groups")
    L.mlp = lib.MLP_MOE_SIGMOID
    L.mlp_in = p.lin(_cat(s.gate_proj.weight, s.up_proj.weight))
    L.mlp_down = p.lin(s.down_proj.weight)
    L.router = p.lin(g.weight.float(), dtype=torch.float32)
    L.e_bias = p.f32(g.e_score_correction_bias)
    L.shared_inter, L.norm_topk = s.gate_proj.weight.shape[0], int(g.renormalize)
    L.groups, L.topk_groups, L.scaling = g.num_groups, g.topk_groups, g.scaling
    _experts(p, L, m.experts, g.top_k, g.weight.shape[1])
