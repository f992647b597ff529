"""Kimi-Linear: Kimi Delta Attention (KDA) linear attention, MLA full attention (NoPE), and a
DeepSeek-style MoE (sigmoid router with a correction bias, grouped top-k, shared experts).

Parameter names follow the checkpoints as published and as `save_pretrained` writes them
(`self_attn.q_conv1d`, `self_attn.f_a_proj`, `experts.{i}.w1` ...). The one difference is the
MLP prefix: checkpoints name the MoE block `block_sparse_moe`, our decoder layer calls it `mlp`;
`checkpoint_name` maps one to the other and the loader applies it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prfaas.model.base import ForwardMeta, FullAttnCache, LinearStateCache
from prfaas.model.config import ModelConfig
from prfaas.model.hybrid import FamilyParts
from prfaas.model.layers import MLP, Experts, GatedRMSNorm, RMSNorm
from prfaas.model.linear_mixing import conv_delta_rule
from prfaas.model.ops.attention import gather_context, gather_padded, store_tokens

MLA_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm use the RMSNorm default, not rms_norm_eps


def checkpoint_name(name: str) -> str:
    """Maps a checkpoint tensor name to ours: `layers.{i}.block_sparse_moe.*` -> `layers.{i}.mlp.*`
    (transformers writes dense MLPs under that prefix too; Moonshot's files use `mlp` for them)."""
    return name.replace(".block_sparse_moe.", ".mlp.")


class KimiDeltaAttention(nn.Module):
    """KDA: short causal conv over q, k, v; a per-channel forget gate; the delta rule; a
    sigmoid-gated RMSNorm on the output heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        spec = cfg.linear
        self.num_heads, self.head_dim, self.kernel = spec.num_k_heads, spec.head_k_dim, spec.conv_kernel
        dim = self.num_heads * self.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, dim, bias=False)
        self.k_proj = nn.Linear(d, dim, bias=False)
        self.v_proj = nn.Linear(d, dim, bias=False)
        self.q_conv1d = nn.Conv1d(dim, dim, self.kernel, groups=dim, bias=False)
        self.k_conv1d = nn.Conv1d(dim, dim, self.kernel, groups=dim, bias=False)
        self.v_conv1d = nn.Conv1d(dim, dim, self.kernel, groups=dim, bias=False)
        # forget gate: g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias), per channel
        self.f_a_proj = nn.Linear(d, self.head_dim, bias=False)
        self.f_b_proj = nn.Linear(self.head_dim, dim, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(dim))
        self.A_log = nn.Parameter(torch.zeros(1, 1, self.num_heads, 1))
        self.b_proj = nn.Linear(d, self.num_heads, bias=False)
        self.g_a_proj = nn.Linear(d, self.head_dim, bias=False)
        self.g_b_proj = nn.Linear(self.head_dim, dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_dim, cfg.rms_norm_eps, activation="sigmoid")
        self.o_proj = nn.Linear(dim, d, bias=False)

    def conv_weight(self) -> torch.Tensor:
        """(3 * dim, W): the q, k, v convs stacked in the conv-state channel order."""
        return torch.cat((self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight)).squeeze(1)

    def forget_gate(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> log decay (T, H, K) in float32."""
        a = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()
        a = a.view(x.shape[0], self.num_heads, self.head_dim)
        return -self.A_log.float().view(self.num_heads, 1).exp() * F.softplus(a, threshold=20.0)

    def _heads(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., 3 * dim) -> q, k, v, each (..., H, K)."""
        lead = mixed.shape[:-1]
        q, k, v = (t.reshape(*lead, self.num_heads, self.head_dim) for t in mixed.chunk(3, dim=-1))
        return q, k, v

    def forward(self, x: torch.Tensor, meta: ForwardMeta, cache: LinearStateCache) -> torch.Tensor:
        t = x.shape[0]
        mixed = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)  # (T, 3 * dim)
        g = self.forget_gate(x)  # (T, H, K)
        beta = torch.sigmoid(self.b_proj(x).float())  # (T, H)
        weight = self.conv_weight()
        scale = self.head_dim**-0.5
        o = conv_delta_rule(mixed, g, beta, weight, scale, self._heads, meta, cache)
        gate = self.g_b_proj(self.g_a_proj(x)).view(t, self.num_heads, self.head_dim)
        o = self.o_norm(o.to(x.dtype), gate)
        return self.o_proj(o.reshape(t, -1))


class KimiMLA(nn.Module):
    """Multi-head latent attention without rotary embedding: the cache holds, per token, the
    normalised latent (kv_lora_rank) and the shared key part k_rot (qk_rope_head_dim), unrotated.

    Prefill expands the context latents to per-head keys and values with kv_b_proj and uses the
    attention backend; a sequence decoding one token uses the absorbed form (queries mapped into
    latent space, attention over the latents, then the value up-projection), which never
    materialises per-head keys for the context."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        spec = cfg.full
        self.num_heads = spec.num_heads
        self.rank, self.nope, self.rope, self.v_dim = (
            spec.kv_lora_rank,
            spec.qk_nope_head_dim,
            spec.qk_rope_head_dim,
            spec.v_head_dim,
        )
        self.qk_dim = self.nope + self.rope
        self.scale = self.qk_dim**-0.5
        self.q_lora_rank = spec.q_lora_rank
        self.absorb_decode = True
        bias = bool(cfg.raw.get("attention_bias", False))
        d, h = cfg.hidden_size, self.num_heads
        if spec.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, spec.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, h * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, MLA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=bias)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (T, H, qk_dim)"""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(x.shape[0], self.num_heads, self.qk_dim)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> what the cache stores per token: concat(norm(kv_nope), k_rot) (T, R + P)."""
        kv_nope, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        return torch.cat((self.kv_a_layernorm(kv_nope), k_rot), dim=-1)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_UK (H, nope, R) and W_UV (H, v, R)."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]

    def decode_absorbed(self, q: torch.Tensor, cache: FullAttnCache, meta: ForwardMeta) -> torch.Tensor:
        """The absorbed form for B sequences of one new token each: q (B, H, qk_dim) over the
        padded latents (B, S, R + P), masked past each length -> (B, H, v)."""
        w_uk, w_uv = self._up_weights()
        ctx = gather_padded(cache.k, meta.padded_block_tables).to(q.dtype)  # (B, S, R + P)
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        q_full = torch.cat((torch.einsum("bhn,hnr->bhr", q_nope, w_uk), q_rot), dim=-1)  # (B, H, R + P)
        scores = torch.einsum("bhc,bsc->bhs", q_full, ctx) * self.scale
        visible = torch.arange(ctx.shape[1], device=q.device)[None, :] < meta.context_lens_tensor[:, None]
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(ctx.dtype)
        o_lat = torch.einsum("bhs,bsr->bhr", probs, ctx[..., : self.rank])  # (B, H, R)
        return torch.einsum("bhr,hvr->bhv", o_lat, w_uv)

    def attend_expanded(self, q: torch.Tensor, ctx: torch.Tensor, meta: ForwardMeta) -> torch.Tensor:
        """q (L, H, qk_dim), ctx latents (S, R + P) -> (L, H, v)."""
        s = ctx.shape[0]
        kv = self.kv_b_proj(ctx[:, : self.rank]).view(s, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (S, H, nope), (S, H, v)
        k_rot = ctx[:, None, self.rank :].expand(s, self.num_heads, self.rope)
        k = torch.cat((k_nope, k_rot), dim=-1)  # (S, H, qk_dim)
        return meta.attn.attend(q, k, v, self.scale)

    def attend_absorbed(self, q: torch.Tensor, ctx: torch.Tensor, meta: ForwardMeta) -> torch.Tensor:
        """Same result as attend_expanded, computed in latent space: every head attends over the
        one shared latent sequence, so the context is read once and never up-projected. Plain
        matmuls (the GQA backends would copy the latent once per head)."""
        w_uk, w_uv = self._up_weights()
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        q_lat = torch.einsum("thn,hnr->thr", q_nope, w_uk)  # (L, H, R)
        q_full = torch.cat((q_lat, q_rot), dim=-1)  # (L, H, R + P)
        scores = torch.einsum("thc,sc->ths", q_full, ctx) * self.scale  # (L, H, S)
        t, s = q.shape[0], ctx.shape[0]
        if t > 1:  # queries sit at positions s-t .. s-1
            visible = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
            scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(ctx.dtype)
        o_lat = torch.einsum("ths,sr->thr", probs, ctx[:, : self.rank])  # (L, H, R)
        return torch.einsum("thr,hvr->thv", o_lat, w_uv)  # (L, H, v)

    def forward(self, x: torch.Tensor, meta: ForwardMeta, cache: FullAttnCache) -> torch.Tensor:
        t = x.shape[0]
        q = self._queries(x)
        store_tokens(cache.k, meta.slot_mapping, self.latents(x))
        if meta.is_decode and self.absorb_decode:  # every sequence at once over its padded latents
            return self.o_proj(self.decode_absorbed(q, cache, meta).reshape(t, -1))
        out = x.new_empty(t, self.num_heads, self.v_dim)
        for i, (s, e) in enumerate(meta.seq_ranges()):
            attend = self.attend_absorbed if e - s == 1 and self.absorb_decode else self.attend_expanded
            ctx = gather_context(cache.k, meta.block_tables[i], meta.context_lens[i]).to(x.dtype)  # (S, R + P)
            out[s:e] = attend(q[s:e], ctx, meta)
        return self.o_proj(out.reshape(t, -1))


class KimiExpert(nn.Module):
    """One routed expert, SwiGLU with the checkpoint's names: w2(silu(w1(x)) * w3(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KimiExperts(Experts):
    """The shared routed experts, named `experts.{i}.w1/w2/w3` in Kimi checkpoints."""

    proj_names = ("w1", "w3", "w2")

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        nn.ModuleList.__init__(self, (KimiExpert(hidden, intermediate) for _ in range(num_experts)))


class KimiRouter(nn.Module):
    """Sigmoid scores; experts are chosen by score + correction bias within the best groups
    (a group's score is the sum of its two best experts); weights are the plain sigmoid scores,
    optionally renormalised, times routed_scaling_factor."""

    e_score_correction_bias: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.num_groups, self.topk_groups = moe.num_groups, moe.topk_groups
        self.renormalize, self.scaling = moe.norm_topk_prob, moe.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(moe.num_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(moe.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> top_idx (T, k) and top_w (T, k) float32."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # (T, E)
        choice = scores + self.e_score_correction_bias.float()
        if self.num_groups > 1:
            grouped = choice.view(x.shape[0], self.num_groups, -1)  # (T, G, E / G)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # (T, G)
            best = group_scores.topk(self.topk_groups, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        top_idx = choice.topk(self.top_k, dim=-1).indices
        top_w = scores.gather(1, top_idx)
        if self.renormalize:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        return top_idx, top_w * self.scaling


class KimiMoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.gate = KimiRouter(cfg)
        self.experts = KimiExperts(moe.num_experts, cfg.hidden_size, moe.intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, moe.shared_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top_idx, top_w = self.gate(x)
        return self.experts(x, top_idx, top_w) + self.shared_experts(x)


def _mixer(cfg: ModelConfig, layer: int) -> tuple[str, nn.Module]:
    if cfg.layer_types[layer] == "linear":
        return "self_attn", KimiDeltaAttention(cfg)
    return "self_attn", KimiMLA(cfg)


def _mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    if cfg.mlp_types[layer] == "moe":
        return KimiMoE(cfg)
    return MLP(cfg.hidden_size, cfg.intermediate_size)


PARTS = FamilyParts(mixer=_mixer, mlp=_mlp, zero_centered_norm=False, checkpoint_name=checkpoint_name)
