"""The gated delta rule, in three forms: a naive reference, a chunked prefill and a decode step.

Per head, with the state S (K, V) and the decay g <= 0 in log space, each token does

    S = exp(g_t) * S                   # g_t is a scalar (Gated DeltaNet) or a (K,) vector (KDA)
    delta = beta_t * (v_t - S^T k_t)
    S = S + k_t delta^T
    o_t = S^T (scale * q_t)

`g` is (B, T, H) for a per-head decay (Qwen3-Next) or (B, T, H, K) for a per-channel decay
(Kimi Delta Attention). q and k come L2-normalised and expanded to the value heads. The state
is always float32; outputs take q's dtype.

The chunked form cuts the sequence into chunks of C tokens. In a chunk that starts from the
state S0, with b_i the decay summed from the chunk start to token i, the deltas solve a unit
lower-triangular system (the UT transform):

    (I + A) delta = beta v - (beta k e^b) S0,   A_ij = beta_i sum_c k_ic k_jc e^(b_ic - b_jc), j < i

so delta = U - W S0, with U and W solved for every chunk at once. The chunk's outputs and end
state are then affine in S0; only the (K, K) x (K, V) step from one chunk's start state to the
next runs sequentially.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUB_CHUNK = 16  # per-channel decay: block of tokens whose pairwise decays are taken exactly
SLAB_ELEMENTS = 1 << 24  # bound on the largest intra-chunk temporary, in float32 elements


def naive_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token in float32: the ground truth. Returns (o (B, T, H, V), state (B, H, K, V))."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if g.dim() == 3:
        g = g.unsqueeze(-1)  # (B, T, H, 1): one decay for every key channel
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float().clone()
    o = q.new_empty(B, T, H, V)
    for t in range(T):
        S = S * g[:, t].exp().unsqueeze(-1)
        kv_mem = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        delta = beta[:, t].unsqueeze(-1) * (v[:, t] - kv_mem)  # (B, H, V)
        S = S + k[:, t].unsqueeze(-1) * delta.unsqueeze(-2)
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S)
    return o.to(out_dtype), S


def recurrent_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One token per sequence: q, k (B, H, K), v (B, H, V), g (B, H) or (B, H, K), beta (B, H).
    Updates `state` (B, H, K, V) float32 in place; returns o (B, H, V) in q's dtype."""
    out_dtype = q.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    decay = g.exp().unsqueeze(-1)  # (B, H, K, 1) or (B, H, 1)
    state.mul_(decay if g.dim() == 3 else decay.unsqueeze(-1))
    kv_mem = (k.unsqueeze(-2) @ state).squeeze(-2)  # (B, H, V)
    delta = beta.unsqueeze(-1) * (v - kv_mem)
    state.add_(k.unsqueeze(-1) * delta.unsqueeze(-2))
    o = ((q * scale).unsqueeze(-2) @ state).squeeze(-2)  # (B, H, V)
    return o.to(out_dtype)


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked prefill. q, k (B, T, H, K), v (B, T, H, V), g (B, T, H) or (B, T, H, K), beta (B, T, H),
    initial_state (B, H, K, V) or None. Returns (o (B, T, H, V) in q's dtype, state (B, H, K, V) float32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    per_channel = g.dim() == 4
    if per_channel and chunk_size % SUB_CHUNK:
        raise ValueError(f"chunk_size {chunk_size} is not a multiple of {SUB_CHUNK}")
    C = chunk_size
    N = -(-T // C)
    G = B * H

    def chunked(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, ...) -> (G, N, C, ...) float32
        x = x.float().movedim(2, 1)  # (B, H, T, ...)
        tail = x.shape[3:]
        x = F.pad(x, (0, 0) * len(tail) + (0, N * C - T))  # zero k, beta, g: padding leaves S alone
        return x.reshape(G, N, C, *tail)

    q, k, v, g, beta = (chunked(x) for x in (q, k, v, g, beta))
    b = g.cumsum(2)  # (G, N, C) or (G, N, C, K): decay from the chunk start, inclusive

    # Per chunk: the maps from its start state to its outputs (o = PU + QW S0) and to its end
    # state (S1 = M S0 + R). Filled a slab of chunks at a time to bound the temporaries.
    PU = q.new_empty(G, N, C, V)
    QW = q.new_empty(G, N, C, K)
    M = q.new_empty(G, N, K, K)
    R = q.new_empty(G, N, K, V)
    per_chunk = C * (K * (SUB_CHUNK + C // SUB_CHUNK) if per_channel else 3 * C + 2 * (K + V))
    slab = max(1, SLAB_ELEMENTS // (G * per_chunk))
    for n0 in range(0, N, slab):
        n1 = min(N, n0 + slab)
        _chunk_maps(
            q[:, n0:n1] * scale, k[:, n0:n1], v[:, n0:n1], b[:, n0:n1], beta[:, n0:n1],
            PU[:, n0:n1], QW[:, n0:n1], M[:, n0:n1], R[:, n0:n1],
        )

    # The only sequential part: carry the state across chunk boundaries.
    S = q.new_zeros(G, K, V) if initial_state is None else initial_state.float().reshape(G, K, V).clone()
    starts = q.new_empty(G, N, K, V)
    for n in range(N):
        starts[:, n] = S
        S = torch.baddbmm(R[:, n], M[:, n], S)

    o = torch.baddbmm(PU.view(G * N, C, V), QW.view(G * N, C, K), starts.view(G * N, K, V))
    o = o.view(B, H, N * C, V)[:, :, :T].transpose(1, 2)  # (B, T, H, V)
    return o.to(out_dtype), S.view(B, H, K, V)


def _chunk_maps(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor, beta: torch.Tensor,
    PU: torch.Tensor, QW: torch.Tensor, M: torch.Tensor, R: torch.Tensor,
) -> None:
    """For chunks given as (G, n, C, ...) with q already scaled, write the affine maps of each
    chunk's start state S0: outputs o = PU + QW S0 (C, V) and end state S1 = M S0 + R (K, V)."""
    V = v.shape[-1]
    kb = k * beta.unsqueeze(-1)
    A, P = _pairwise_per_channel(q, k, kb, b) if b.dim() == 4 else _pairwise_per_head(q, k, kb, b)
    bk = b if b.dim() == 4 else b.unsqueeze(-1)  # (G, n, C, K) or (G, n, C, 1)
    rhs = torch.cat([v * beta.unsqueeze(-1), kb * bk.exp()], dim=-1)  # (G, n, C, V + K)
    UW = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # [U | W]
    PUW = P @ UW
    PU.copy_(PUW[..., :V])
    torch.sub(q * bk.exp(), PUW[..., V:], out=QW)
    b_end = bk[:, :, -1:]  # (G, n, 1, K or 1)
    KUW = (k * (b_end - bk).exp()).transpose(-1, -2) @ UW  # (G, n, K, V + K)
    R.copy_(KUW[..., :V])
    torch.neg(KUW[..., V:], out=M)
    M.diagonal(dim1=-2, dim2=-1).add_(b_end.squeeze(-2).exp())


def _pairwise_per_head(
    q: torch.Tensor, k: torch.Tensor, kb: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_ij = kb_i . k_j e^(b_i - b_j) and P_ij = q_i . k_j e^(b_i - b_j) for j <= i, (G, n, C, C);
    b is (G, n, C). The diagonal of A is left in: the solve takes it as one."""
    C = q.shape[2]
    dots = torch.cat([kb, q], dim=2) @ k.transpose(-1, -2)  # (G, n, 2C, C)
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    decay = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill_(upper, float("-inf")).exp_()  # (G, n, C, C)
    return dots[..., :C, :] * decay, dots[..., C:, :] * decay


def _pairwise_per_channel(
    q: torch.Tensor, k: torch.Tensor, kb: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `_pairwise_per_head` with b (G, n, C, K): the decay e^(b_ic - b_jc) differs per channel.

    Splitting it as e^(b_i) e^(-b_j) overflows for strong decays, so every factor is taken
    relative to a point between the two tokens: for j in an earlier sub-chunk than i, the start
    r of i's sub-chunk (e^(b_i - b_r) e^(b_r - b_j), both exponents <= 0, one matmul); for j in
    the same sub-chunk, the pairwise differences directly (a (s, s, K) tensor per sub-chunk)."""
    G, n, C, K = q.shape
    s = SUB_CHUNK
    m = C // s
    sub = (G, n, m, s, K)
    bs = b.view(sub)
    ref = bs[..., :1, :]  # (G, n, m, 1, K): decay at each sub-chunk's first token

    # Earlier sub-chunks: (G, n, m, 2s, K) @ (G, n, m, K, C)
    to_ref = (bs - ref).exp()
    X = torch.cat([kb.view(sub) * to_ref, q.view(sub) * to_ref], dim=-2)
    Y = k.unsqueeze(2) * (ref - b.unsqueeze(2)).clamp_(max=0).exp_()  # (G, n, m, C, K), j < r exact
    XY = X @ Y.transpose(-1, -2)  # (G, n, m, 2s, C)
    pos = torch.arange(C, device=q.device)
    earlier = (pos.unsqueeze(0) < (pos // s * s).unsqueeze(1)).view(m, s, C)
    A = XY[..., :s, :].mul(earlier).view(G, n, C, C)
    P = XY[..., s:, :].mul(earlier).view(G, n, C, C)

    # Same sub-chunk: (G, n, m, s, s, K)
    kD = (bs.unsqueeze(-2) - bs.unsqueeze(-3)).clamp_(max=0).exp_().mul_(k.view(G, n, m, 1, s, K))
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    for out, x in ((A, kb), (P, q)):
        block = (x.view(sub).unsqueeze(-2) * kD).sum(-1).mul_(causal)  # (G, n, m, s, s)
        torch.diagonal(out.view(G, n, m, s, m, s), dim1=2, dim2=4).copy_(block.permute(0, 1, 3, 4, 2))
    return A, P
