"""The gated delta rule, in three forms: a naive reference, a chunked prefill and a decode step.

Per head, with the state S (K, V) and the decay g <= 0 in log space, each token does

    S = exp(g_t) * S                   # g_t is a scalar (Gated DeltaNet) or a (K,) vector (KDA)
    delta = beta_t * (v_t - S^T k_t)
    S = S + k_t delta^T
    o_t = S^T (scale * q_t)

`g` is (B, T, H) for a per-head decay (Qwen3-Next) or (B, T, H, K) for a per-channel decay
(Kimi Delta Attention). The chunked form and the step take q and k on the key heads (Hk dividing
H, grouped as Gated DeltaNet's) and can L2-normalise them themselves (`l2norm_qk`); the naive
reference takes them normalised and expanded to the value heads. The state is always float32.
On the CPU the model runs our C kernel instead (`cpu_kernel.py`, the recurrent form); these torch
forms are the reference it is tested against and the path on other devices.

The chunked form cuts the sequence into chunks of C tokens. In a chunk that starts from the
state S0, with b_i the decay summed from the chunk start to token i, the deltas solve a unit
lower-triangular system (the UT transform):

    (I + A) delta = beta v - (beta k e^b) S0,   A_ij = beta_i sum_c k_ic k_jc e^(b_ic - b_jc), j < i

so delta = U - W S0, with U and W solved for every chunk at once. Only the carry of the state
from one chunk to the next runs sequentially (two matmuls per chunk); the outputs of all chunks
then come from their start states in one batched matmul. For a per-channel decay the pairwise
factors e^(b_i - b_j) are never split as e^(b_i) e^(-b_j), which overflows for strong decays
(see `_decayed_dots`); decay factors below e^FLUSH_BELOW are flushed to 0 (denormals).
"""

from __future__ import annotations

import torch

# Fastest on CPU (bench/ops.py, T = 4096): the per-channel decay's intra-chunk work grows with C.
CHUNK_PER_HEAD = 32
CHUNK_PER_CHANNEL = 32
SUB_CHUNKS = (8, 1)  # per-channel decay: nested block sizes inside a chunk (see _decayed_dots)
SLAB_ELEMENTS = 1 << 24  # bound on the largest intra-chunk temporary, in float32 elements
# Decay factors below e^FLUSH_BELOW (about 1e-13 of the largest, which is 1) are taken as 0. Without
# this, strong decays put float32 products into the denormal range, where x86 CPUs run many times
# slower (the whole chunked rule about 2x slower on a checkpoint whose decay is -1.3 per token).
FLUSH_BELOW = -30.0


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
    *,
    l2norm_qk: bool = False,
) -> torch.Tensor:
    """One token per sequence: q, k (B, Hk, K) with Hk dividing H (grouped, as in
    `chunk_delta_rule`), v (B, H, V), g (B, H) or (B, H, K), beta (B, H); `l2norm_qk` normalises q
    and k first. Updates `state` (B, H, K, V) float32 in place; returns o (B, H, V) in v's dtype.
    Written as few batched products as possible: a decode step runs it once per linear layer."""
    B, Hk, K = q.shape
    H, V = v.shape[1], v.shape[2]
    qf, kf = q.float(), k.float()
    if l2norm_qk:
        qf, kf = qf * _inv_norm(qf).mul_(scale), kf * _inv_norm(kf)
    else:
        qf = qf * scale
    if Hk < H:  # each key head serves H / Hk value heads
        qf = qf.unsqueeze(2).expand(B, Hk, H // Hk, K).reshape(B, H, K)
        kf = kf.unsqueeze(2).expand(B, Hk, H // Hk, K).reshape(B, H, K)
    S = state if state.is_contiguous() else state.contiguous()
    decay = g.float().exp()
    S.mul_(decay.view(B, H, K, 1) if g.dim() == 3 else decay.view(B, H, 1, 1))
    S3 = S.view(B * H, K, V)
    kf = kf.reshape(B * H, K)
    kv_mem = torch.bmm(kf.view(B * H, 1, K), S3)  # (BH, 1, V)
    delta = torch.sub(v.float().reshape(B * H, 1, V), kv_mem).mul_(beta.float().reshape(B * H, 1, 1))
    S3.baddbmm_(kf.view(B * H, K, 1), delta)  # S += k delta^T
    o = torch.bmm(qf.reshape(B * H, 1, K), S3).view(B, H, V)
    if S is not state:
        state.copy_(S)
    return o.to(v.dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the q/k normalisation of both families)."""
    return x * _inv_norm(x, eps)


def _inv_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return torch.linalg.vecdot(xf, xf).unsqueeze(-1).add_(eps).rsqrt_()


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
    *,
    l2norm_qk: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked prefill. q, k (B, T, Hk, K), v (B, T, H, V), g (B, T, H) or (B, T, H, K), beta (B, T, H),
    initial_state (B, H, K, V) or None (zeros). Hk divides H: value head h reads key head
    h // (H / Hk) (grouped heads, as Gated DeltaNet's), without the keys being copied per value head.
    `l2norm_qk` normalises q and k here (as `l2norm`), folded into their first copy. chunk_size None
    picks the measured best for the gate kind. Returns (o (B, T, H, V) in v's dtype, final state
    (B, H, K, V) float32)."""
    B, T, Hk, K = q.shape
    H = v.shape[2]
    if H % Hk or k.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not group the {H} value heads")
    if g.dim() == 4:
        if l2norm_qk:
            q, k = l2norm(q.float()), l2norm(k.float())
        if Hk < H:
            q, k = (x.repeat_interleave(H // Hk, dim=2) for x in (q, k))
        return _chunk_per_channel(q, k, v, g, beta, scale, initial_state, chunk_size or CHUNK_PER_CHANNEL)
    return _chunk_per_head(q, k, v, g, beta, scale, initial_state, chunk_size or CHUNK_PER_HEAD, l2norm_qk)


def _chunk_per_head(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    C: int,
    l2norm_qk: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scalar-decay case, written for few passes over memory (the op is bandwidth-bound on a CPU):
    normalisation, scale and beta are applied in the copies into the chunked layout; the key
    products are formed once per key head and decayed per value head; the intra-chunk work, the
    state carry and the outputs run a slab of chunks at a time, so temporaries stay bounded."""
    B, T, Hk, K = q.shape
    H, V = v.shape[2], v.shape[3]
    r = H // Hk
    N, GK, G = -(-T // C), B * Hk, B * H
    f32 = torch.float32
    qk, vb, bc, b, eb, k_to_end = _per_head_chunks(q, k, v, g, beta, scale, C, l2norm_qk)
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    eye = torch.eye(C, dtype=f32, device=q.device)
    states = q.new_empty(N + 1, G, K, V, dtype=f32)  # the state entering each chunk, and the final one
    states[0] = 0 if initial_state is None else initial_state.reshape(G, K, V)
    o = q.new_empty(N, G, C, V, dtype=f32)
    slab = max(1, SLAB_ELEMENTS // (G * C * (4 * C + 3 * K + 2 * V)))
    for n0 in range(0, N, slab):
        n1 = min(N, n0 + slab)
        n = n1 - n0
        kq, b_s = qk[n0:n1], b[n0:n1]
        k_s = kq[:, :, 0]  # (n, GK, C, K)
        q_s = kq[:, :, 1]
        # keys against keys and queries in one product per key head: (n, GK, 2C, C)
        dots = torch.matmul(kq.view(n, GK, 2 * C, K), k_s.transpose(-1, -2))
        diff = b_s.unsqueeze(-1) - b_s.unsqueeze(-2)  # (n, G, C, C): b_i - b_j
        far = (diff < FLUSH_BELOW).logical_or_(upper)  # the decay is 0 (flushed, or j > i)
        decay = diff.masked_fill_(far, float("-inf")).exp_().view(n, GK, r, C, C)
        dots = dots.view(n, GK, 1, 2, C, C)
        A = torch.mul(dots[:, :, :, 0], decay).view(n, G, C, C).mul_(bc[n0:n1].unsqueeze(-1))
        P = torch.mul(dots[:, :, :, 1], decay).view(n, G, C, C)
        inverse = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)  # (I + A)^-1
        inverse.masked_fill_(far, 0.0)  # every path from j to i carries e^(b_i - b_j): 0 where that is
        delta = torch.matmul(inverse, vb[n0:n1])  # U; becomes delta = U - W S0 below
        kbe = k_s.unsqueeze(2) * (bc[n0:n1] * eb[n0:n1]).view(n, GK, r, C, 1)  # beta k e^b per value head
        Wm = torch.matmul(inverse, kbe.view(n, G, C, K))
        ke = (k_s.unsqueeze(2) * k_to_end[n0:n1].view(n, GK, r, C, 1)).view(n, G, C, K).transpose(-1, -2)
        end_decay = eb[n0:n1, :, -1:].unsqueeze(-1)  # (n, G, 1, 1)
        # the carry, the only sequential part: S1 = e^b_end S0 + (k e^(b_end - b))^T delta
        for i in range(n):
            s0 = states[n0 + i]
            delta[i].baddbmm_(Wm[i], s0, alpha=-1)
            torch.mul(s0, end_decay[i], out=states[n0 + i + 1]).baddbmm_(ke[i], delta[i])
        # outputs of the slab's chunks at once: o = (q e^b) S0 + P delta
        qe = (q_s.unsqueeze(2) * eb[n0:n1].view(n, GK, r, C, 1)).view(n * G, C, K)
        o_s = o[n0:n1].view(n * G, C, V)
        torch.bmm(qe, states[n0:n1].view(n * G, K, V), out=o_s)
        o_s.baddbmm_(P.view(n * G, C, C), delta.view(n * G, C, V))
    return _unchunked(o.view(N, B, H, C, V), T, v.dtype), states[N].view(B, H, K, V).clone()


def _per_head_chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float, C: int,
    l2norm_qk: bool,
) -> tuple[torch.Tensor, ...]:
    """The inputs of `_chunk_per_head` in its chunked layout, normalised, scaled and beta-weighted
    on the way in: keys and queries (N, GK, 2, C, K), beta v (N, G, C, V), beta (N, G, C), the
    decay from each chunk's start b, e^b, and e^(b_end - b) (all (N, G, C))."""
    B, T, Hk, K = q.shape
    H, V = v.shape[2], v.shape[3]
    N, GK, G, f32 = -(-T // C), B * Hk, B * H, torch.float32
    q_mul = _inv_norm(q).mul_(scale) if l2norm_qk else scale
    k_mul = _inv_norm(k) if l2norm_qk else None
    qk = q.new_empty(N, GK, 2, C, K, dtype=f32)  # per chunk and key head: C keys, then C queries
    _to_chunks(k, C, qk[:, :, 0], k_mul)
    _to_chunks(q, C, qk[:, :, 1], q_mul)
    vb = _to_chunks(v, C, v.new_empty(N, G, C, V, dtype=f32), beta.float().unsqueeze(-1))  # beta v
    gc = _to_chunks(g, C, g.new_empty(N, G, C, dtype=f32))
    bc = _to_chunks(beta, C, beta.new_empty(N, G, C, dtype=f32))
    b = gc.cumsum(-1)  # (N, G, C): decay from the chunk start, inclusive
    eb = _decay(b.clone())  # e^b
    k_to_end = _decay(b[..., -1:] - b)  # (N, G, C): e^(b_end - b)
    return qk, vb, bc, b, eb, k_to_end


def _chunk_per_channel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    C: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel decay (KDA): q, k (B, T, H, K) one per value head."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    if C % SUB_CHUNKS[0]:
        raise ValueError(f"chunk_size {C} is not a multiple of {SUB_CHUNKS[0]}")
    N = -(-T // C)
    G = B * H

    q, k, v, g, beta = (_chunked(x, C) for x in (q, k, v, g, beta))
    q = q * scale
    b = g.cumsum(2)  # (N, G, C, K): decay from the chunk start, inclusive
    eb = _decay(b.clone())
    kb = k * beta.unsqueeze(-1)

    # Intra-chunk, every chunk at once (a slab at a time, to bound the temporaries):
    # delta = U - W S0 with (I + A) [U | W] = [beta v | kb e^b].
    P = q.new_empty(N, G, C, C)
    U = q.new_empty(N, G, C, V)
    W = q.new_empty(N, G, C, K)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    per_chunk = G * C * (3 * C + 2 * (K + V))
    slab = max(1, SLAB_ELEMENTS // per_chunk)
    for n0 in range(0, N, slab):
        n = slice(n0, n0 + slab)
        A, P[n] = _decayed_dots([kb[n], q[n]], k[n], b[n], SUB_CHUNKS)
        inverse = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)  # (I + A)^-1
        torch.matmul(inverse, v[n] * beta[n].unsqueeze(-1), out=U[n])
        torch.matmul(inverse, kb[n] * eb[n], out=W[n])

    # Inter-chunk, the only sequential part: S1 = e^b_end S0 + (k e^(b_end - b))^T delta.
    b_end = b[:, :, -1:]  # (N, G, 1, K)
    end_decay = eb[:, :, -1:].transpose(-1, -2)  # (N, G, K, 1): scales the rows of S
    k_to_end = (k * _decay(b_end - b)).transpose(-1, -2)  # (N, G, K, C)
    starts = q.new_empty(N + 1, G, K, V)  # the state entering each chunk, and the final one
    starts[0] = 0 if initial_state is None else initial_state.reshape(G, K, V)
    delta = U  # overwritten in place: delta = U - W S0
    for i in range(N):
        delta[i].baddbmm_(W[i], starts[i], alpha=-1)
        torch.mul(starts[i], end_decay[i], out=starts[i + 1]).baddbmm_(k_to_end[i], delta[i])

    # Outputs of every chunk at once: o = (q e^b) S0 + P delta.
    o = (q * eb).view(N * G, C, K).bmm(starts[:N].view(N * G, K, V))
    o = o.baddbmm_(P.view(N * G, C, C), delta.view(N * G, C, V))
    return _unchunked(o.view(N, B, H, C, V), T, out_dtype), starts[N].view(B, H, K, V).clone()


def _decay(x: torch.Tensor) -> torch.Tensor:
    """e^x in place for x <= 0, with e^x < e^FLUSH_BELOW set to exactly 0."""
    return x.masked_fill_(x < FLUSH_BELOW, float("-inf")).exp_()


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


def _to_chunks(
    x: torch.Tensor, C: int, out: torch.Tensor, mul: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Writes x (B, T, Hx, ...) times `mul` (a float32 tensor broadcasting like x, or a scalar) into `out`, a
    (N, B * Hx, C, ...) view, zero-padded to N * C tokens, in one pass. Returns out."""
    B, T, Hx, *tail = x.shape
    N, full = out.shape[0], T // C
    dst = out.view(N, B, Hx, C, *tail).movedim((0, 3), (1, 2))  # (B, N, C, Hx, ...) view
    parts = [(dst[:, :full], slice(0, full * C), (B, full, C, Hx, *tail))]
    if full < N:
        parts.append((dst[:, full, : T - full * C], slice(full * C, T), (B, T - full * C, Hx, *tail)))
        dst[:, full, T - full * C :].zero_()
    for d, span, shape in parts:
        src = x[:, span].reshape(shape)
        if mul is None:
            d.copy_(src)
        elif isinstance(mul, float):  # a python scalar would be applied in x's dtype
            d.copy_(src).mul_(mul)
        else:
            torch.mul(src, mul[:, span].reshape(*shape[: len(shape) - len(tail)], *mul.shape[3:]), out=d)
    return out


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
