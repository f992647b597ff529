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

so delta = U - W S0, with U and W solved for every chunk at once. Only the carry of the state
from one chunk to the next runs sequentially (two matmuls per chunk); the outputs of all chunks
then come from their start states in one batched matmul. For a per-channel decay the pairwise
factors e^(b_i - b_j) are never split as e^(b_i) e^(-b_j), which overflows for strong decays
(see `_decayed_dots`).
"""

from __future__ import annotations

import torch

# Fastest on CPU (bench/ops.py, T = 4096): the per-channel decay's intra-chunk work grows with C.
CHUNK_PER_HEAD = 64
CHUNK_PER_CHANNEL = 32
SUB_CHUNKS = (8, 1)  # per-channel decay: nested block sizes inside a chunk (see _decayed_dots)
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
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked prefill. q, k (B, T, H, K), v (B, T, H, V), g (B, T, H) or (B, T, H, K), beta (B, T, H),
    initial_state (B, H, K, V) or None (zeros); chunk_size None picks the measured best for the
    gate kind. Returns (o (B, T, H, V) in q's dtype, final state (B, H, K, V) float32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    per_channel = g.dim() == 4
    C = chunk_size or (CHUNK_PER_CHANNEL if per_channel else CHUNK_PER_HEAD)
    if per_channel and C % SUB_CHUNKS[0]:
        raise ValueError(f"chunk_size {C} is not a multiple of {SUB_CHUNKS[0]}")
    N = -(-T // C)
    G = B * H

    q, k, v, g, beta = (_chunked(x, C) for x in (q, k, v, g, beta))
    q = q * scale
    b = g.cumsum(2)  # (N, G, C) or (N, G, C, K): decay from the chunk start, inclusive
    bk = b if per_channel else b.unsqueeze(-1)  # broadcasts over key channels
    kb = k * beta.unsqueeze(-1)

    # Intra-chunk, every chunk at once (a slab at a time, to bound the temporaries):
    # delta = U - W S0 with (I + A) [U | W] = [beta v | kb e^b].
    P = q.new_empty(N, G, C, C)
    U = q.new_empty(N, G, C, V)
    W = q.new_empty(N, G, C, K)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    per_chunk = G * C * (3 * C + 2 * (K + V))
    slab = max(1, SLAB_ELEMENTS // per_chunk)
    pairwise = _pairwise_per_channel if per_channel else _pairwise_per_head
    for n0 in range(0, N, slab):
        n = slice(n0, n0 + slab)
        A, P[n] = pairwise(q[n], k[n], kb[n], b[n])
        inverse = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)  # (I + A)^-1
        torch.matmul(inverse, v[n] * beta[n].unsqueeze(-1), out=U[n])
        torch.matmul(inverse, kb[n] * bk[n].exp(), out=W[n])

    # Inter-chunk, the only sequential part: S1 = e^b_end S0 + (k e^(b_end - b))^T delta.
    b_end = bk[:, :, -1:]  # (N, G, 1, K or 1)
    end_decay = b_end.exp().transpose(-1, -2)  # (N, G, K or 1, 1): scales the rows of S
    k_to_end = (k * (b_end - bk).exp()).transpose(-1, -2)  # (N, G, K, C)
    starts = q.new_empty(N + 1, G, K, V)  # the state entering each chunk, and the final one
    starts[0] = 0 if initial_state is None else initial_state.reshape(G, K, V)
    delta = U  # overwritten in place: delta = U - W S0
    for i in range(N):
        delta[i].baddbmm_(W[i], starts[i], alpha=-1)
        torch.mul(starts[i], end_decay[i], out=starts[i + 1]).baddbmm_(k_to_end[i], delta[i])

    # Outputs of every chunk at once: o = (q e^b) S0 + P delta.
    o = (q * bk.exp()).view(N * G, C, K).bmm(starts[:N].view(N * G, K, V))
    o = o.baddbmm_(P.view(N * G, C, C), delta.view(N * G, C, V))
    return _unchunked(o.view(N, B, H, C, V), T, out_dtype), starts[N].view(B, H, K, V).clone()


def _chunked(x: torch.Tensor, C: int) -> torch.Tensor:
    """(B, T, H, ...) -> (N, B * H, C, ...) float32, zero-padded to N * C tokens (zero k, beta
    and g leave the state as it is)."""
    B, T, H, *tail = x.shape
    N, full = -(-T // C), T // C
    out = torch.empty(N, B, H, C, *tail, dtype=torch.float32, device=x.device)
    dst = out.movedim((0, 2), (1, 3))  # (B, N, C, H, ...) view
    dst[:, :full].copy_(x[:, : full * C].reshape(B, full, C, H, *tail))
    if full < N:
        dst[:, full, : T - full * C].copy_(x[:, full * C :])
        dst[:, full, T - full * C :].zero_()
    return out.view(N, B * H, C, *tail)


def _unchunked(o: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, B, H, C, V) -> (B, T, H, V) in `dtype`, dropping the padding."""
    N, B, H, C, V = o.shape
    full = T // C
    out = torch.empty(B, T, H, V, dtype=dtype, device=o.device)
    src = o.movedim((0, 2), (1, 3))  # (B, N, C, H, V) view
    out[:, : full * C].view(B, full, C, H, V).copy_(src[:, :full])
    if full < N:
        out[:, full * C :].copy_(src[:, full, : T - full * C])
    return out


def _pairwise_per_head(
    q: torch.Tensor, k: torch.Tensor, kb: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_ij = kb_i . k_j e^(b_i - b_j) and P_ij = q_i . k_j e^(b_i - b_j) for j <= i, else 0:
    (..., C, C) from (..., C, K) and b (..., C). The diagonal of A stays: the solve reads it as 1."""
    C = q.shape[-2]
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    decay = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill_(upper, float("-inf")).exp_()  # (G, n, C, C)
    kt = k.transpose(-1, -2)
    return (kb @ kt).mul_(decay), (q @ kt).mul_(decay)


def _pairwise_per_channel(
    q: torch.Tensor, k: torch.Tensor, kb: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `_pairwise_per_head` with b (..., C, K): the decay e^(b_ic - b_jc) differs per channel."""
    A, P = _decayed_dots([kb, q], k, b, SUB_CHUNKS)
    return A, P


def _decayed_dots(
    xs: list[torch.Tensor], y: torch.Tensor, b: torch.Tensor, sizes: tuple[int, ...]
) -> list[torch.Tensor]:
    """For each x in xs (..., L, K): M_ij = sum_c x_ic y_jc e^(b_ic - b_jc) for j <= i, else 0 (..., L, L).

    Splitting the decay as e^(b_i) e^(-b_j) overflows for strong decays, so it is split at a
    point r between the two tokens instead: e^(b_i - b_r) e^(b_r - b_j), both exponents <= 0 as
    b only falls along the chunk. The L tokens are cut into blocks of sizes[0]; pairs in
    different blocks take r = the first token of i's block (one matmul per block), pairs inside
    a block recurse on sizes[1:] down to blocks of one token, where the decay is e^0 = 1."""
    *lead, L, K = y.shape
    if not sizes:  # L == 1
        return [(x * y).sum(-1, keepdim=True) for x in xs]
    s = sizes[0]
    m = L // s
    outs = [y.new_zeros(*lead, L, L) for _ in xs]
    for r in range(s, L, s):  # the block [r, r + s) against every token before it
        ref = b[..., r : r + 1, :]
        y_from = (ref - b[..., :r, :]).exp_().mul_(y[..., :r, :]).transpose(-1, -2)  # (..., K, r)
        x_to = (b[..., r : r + s, :] - ref).exp_()  # (..., s, K)
        for out, x in zip(outs, xs, strict=True):
            out[..., r : r + s, :r] = (x[..., r : r + s, :] * x_to) @ y_from
    blocked = [*lead, m, s, K]
    inner = _decayed_dots([x.view(blocked) for x in xs], y.view(blocked), b.view(blocked), sizes[1:])
    for out, block in zip(outs, inner, strict=True):  # (..., m, s, s) -> the diagonal blocks of out
        torch.diagonal(out.view(*lead, m, s, m, s), dim1=-4, dim2=-2).copy_(block.movedim(-3, -1))
    return outs
