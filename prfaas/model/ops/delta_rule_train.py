"""The gated delta rule and the short conv for training: batched, zero initial state, written
only with out-of-place ops so that autograd can run backward through them.

The serving forms (`prfaas/model/ops/delta_rule.py`, the C kernel) write into preallocated
buffers and states in place and have no backward. This is the same chunked algorithm (see that
module's doc: delta = U - W S0 per chunk, the state carried from chunk to chunk), kept simple:
per-channel decays (KDA) materialise the pairwise factors e^(b_i - b_j) of a chunk, so the chunk
is short. `tests/engine/test_train_forward.py` checks outputs and gradients against the naive reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_PER_HEAD = 64
CHUNK_PER_CHANNEL = 8


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, L, C), weight (C, W) -> silu(causal depthwise conv) (B, L, C) in float32 or wider, from a zero state."""
    w = weight.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    xt = F.pad(x.to(dtype).transpose(1, 2), (w - 1, 0))  # (B, C, W - 1 + L)
    y = F.conv1d(xt, weight.to(dtype).unsqueeze(1), groups=weight.shape[0])  # (B, C, L)
    return F.silu(y).transpose(1, 2)


def _chunks(x: torch.Tensor, c: int) -> torch.Tensor:
    """(B, T, H, ...) -> (B, H, N, C, ...) in float32 or wider, zero-padded to N * C tokens (zero k, v, beta and
    g leave the state unchanged, and the padded outputs are dropped)."""
    b, t, h, *tail = x.shape
    n = -(-t // c)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if n * c != t:
        x = torch.cat((x, x.new_zeros(b, n * c - t, h, *tail)), dim=1)
    return x.view(b, n, c, h, *tail).movedim(3, 1)


def chunk_delta_rule_train(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """q, k (B, T, H, K), already L2-normalised and on the value heads; v (B, T, H, V);
    g (B, T, H) per-head or (B, T, H, K) per-channel log decay; beta (B, T, H).
    Returns o (B, T, H, V) in float32 (float64 for float64 inputs)."""
    per_channel = g.dim() == 4
    c = chunk_size or (CHUNK_PER_CHANNEL if per_channel else CHUNK_PER_HEAD)
    t = q.shape[1]
    qc, kc, vc, gc, bc = (_chunks(x, c) for x in (q, k, v, g, beta))  # (B, H, N, C, ...)
    bsum = gc.cumsum(3)  # decay from the chunk start, inclusive: (B, H, N, C) or (B, H, N, C, K)
    lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    strict = lower.logical_and(~torch.eye(c, dtype=torch.bool, device=q.device))
    if per_channel:
        diff = bsum.unsqueeze(4) - bsum.unsqueeze(3)  # (B, H, N, C, C, K): b_i - b_j
        kd = diff.masked_fill(~lower[:, :, None], float("-inf")).exp() * kc.unsqueeze(3)  # k_j e^(b_i - b_j)
        kk = torch.linalg.vecdot(kd, kc.unsqueeze(4))  # (B, H, N, C, C)
        qk = torch.linalg.vecdot(kd, qc.unsqueeze(4))
        eb = bsum.exp()  # (B, H, N, C, K)
        k_end = kc * (bsum[:, :, :, -1:] - bsum).exp()
        end_decay = eb[:, :, :, -1].unsqueeze(-1)  # (B, H, N, K, 1): scales the state's rows
    else:
        decay = (bsum.unsqueeze(4) - bsum.unsqueeze(3)).masked_fill(~lower, float("-inf")).exp()
        kk = (kc @ kc.transpose(-1, -2)) * decay
        qk = (qc @ kc.transpose(-1, -2)) * decay
        eb = bsum.exp().unsqueeze(-1)  # (B, H, N, C, 1)
        k_end = kc * (bsum[:, :, :, -1:] - bsum).exp().unsqueeze(-1)
        end_decay = eb[:, :, :, -1].unsqueeze(-1)  # (B, H, N, 1, 1)
    beta_col = bc.unsqueeze(-1)  # (B, H, N, C, 1)
    a = (kk * beta_col).masked_fill(~strict, 0.0)  # A_ij = beta_i k_i.k_j e^(b_i - b_j), j < i
    eye = torch.eye(c, dtype=a.dtype, device=a.device)
    u = torch.linalg.solve_triangular(a + eye, vc * beta_col, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(a + eye, kc * beta_col * eb, upper=False, unitriangular=True)
    qe = qc * eb * scale
    p = qk * scale
    bsz, h, n = qc.shape[:3]
    state = qc.new_zeros(bsz, h, k.shape[-1], v.shape[-1])
    outs = []
    for i in range(n):  # the carry from chunk to chunk: the only sequential part
        delta = u[:, :, i] - w[:, :, i] @ state  # (B, H, C, V)
        outs.append(qe[:, :, i] @ state + p[:, :, i] @ delta)
        state = state * end_decay[:, :, i] + k_end[:, :, i].transpose(-1, -2) @ delta
    o = torch.stack(outs, dim=2)  # (B, H, N, C, V)
    return o.movedim(1, 3).reshape(bsz, n * c, h, -1)[:, :t]
