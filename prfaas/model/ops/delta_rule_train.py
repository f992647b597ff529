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

CHUNK_PER_HEAD = 32
CHUNK_PER_CHANNEL = 8


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, L, C), weight (C, W) -> silu(causal depthwise conv) (B, L, C) in float32 or wider, from a zero state."""
    w = weight.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    xt = F.pad(x.to(dtype).transpose(1, 2), (w - 1, 0))  # (B, C, W - 1 + L)
    y = F.conv1d(xt, weight.to(dtype).unsqueeze(1), groups=weight.shape[0])  # (B, C, L)
    return F.silu(y).transpose(1, 2)


def _chunks(x: torch.Tensor, c: int) -> torch.Tensor:
    """(B, T, H, ...) -> (N, B, H, C, ...) contiguous, in float32 or wider, zero-padded to N * C
    tokens (zero k, v, beta and g leave the state unchanged, and the padded outputs are dropped).
    Chunks lead, so that the sequential loop reads contiguous slices."""
    b, t, h, *tail = x.shape
    n = -(-t // c)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if n * c != t:
        x = torch.cat((x, x.new_zeros(b, n * c - t, h, *tail)), dim=1)
    return x.view(b, n, c, h, *tail).permute(1, 0, 3, 2, *range(4, 4 + len(tail))).contiguous()


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
    bsz, t, h, _ = q.shape
    qc, kc, vc, gc, bc = (_chunks(x, c) for x in (q, k, v, g, beta))  # (N, B, H, C, ...)
    bsum = gc.cumsum(3)  # decay from the chunk start, inclusive: (N, B, H, C) or (N, B, H, C, K)
    lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    strict = lower.logical_and(~torch.eye(c, dtype=torch.bool, device=q.device))
    if per_channel:
        diff = bsum.unsqueeze(4) - bsum.unsqueeze(3)  # (N, B, H, C, C, K): b_i - b_j
        kd = diff.masked_fill(~lower[:, :, None], float("-inf")).exp() * kc.unsqueeze(3)  # k_j e^(b_i - b_j)
        kk = torch.linalg.vecdot(kd, kc.unsqueeze(4))  # (N, B, H, C, C)
        qk = torch.linalg.vecdot(kd, qc.unsqueeze(4))
        eb = bsum.exp()  # (N, B, H, C, K)
        k_end = kc * (bsum[..., -1:, :] - bsum).exp()
        end_decay = eb[..., -1, :].unsqueeze(-1)  # (N, B, H, K, 1): scales the state's rows
    else:
        decay = (bsum.unsqueeze(4) - bsum.unsqueeze(3)).masked_fill(~lower, float("-inf")).exp()
        kk = (kc @ kc.transpose(-1, -2)) * decay
        qk = (qc @ kc.transpose(-1, -2)) * decay
        eb = bsum.exp().unsqueeze(-1)  # (N, B, H, C, 1)
        k_end = kc * (bsum[..., -1:] - bsum).exp().unsqueeze(-1)
        end_decay = eb[..., -1:, :]  # (N, B, H, 1, 1)
    beta_col = bc.unsqueeze(-1)  # (N, B, H, C, 1)
    a = (kk * beta_col).masked_fill(~strict, 0.0)  # A_ij = beta_i k_i.k_j e^(b_i - b_j), j < i
    eye = torch.eye(c, dtype=a.dtype, device=a.device)
    rhs = torch.cat((vc * beta_col, kc * beta_col * eb), dim=-1)  # [beta v | beta k e^b]
    uw = torch.linalg.solve_triangular(a + eye, rhs, upper=False, unitriangular=True)
    vdim = v.shape[-1]
    u, w = uw[..., :vdim], uw[..., vdim:]  # delta = U - W S0
    wq = torch.cat((w, qc * eb * scale), dim=-2).contiguous()  # (N, B, H, 2C, K): W over q e^b
    p = (qk * scale).masked_fill(~lower, 0.0)
    k_end_t = k_end.transpose(-1, -2).contiguous()  # (N, B, H, K, C)
    u = u.contiguous()
    state = qc.new_zeros(bsz, h, k.shape[-1], vdim)
    outs = []
    # per-chunk views by unbind: its backward stacks the gradients once, where indexing x[i] in
    # the loop would add a zero-filled gradient of the whole of x per chunk
    per_chunk = zip(wq.unbind(0), u.unbind(0), p.unbind(0), end_decay.unbind(0), k_end_t.unbind(0), strict=True)
    for wq_i, u_i, p_i, decay_i, k_end_i in per_chunk:  # the carry from chunk to chunk: the only sequential part
        ws = wq_i @ state  # (B, H, 2C, V): W S0 and (q e^b) S0
        delta = u_i - ws[..., :c, :]
        outs.append(ws[..., c:, :] + p_i @ delta)
        state = state * decay_i + k_end_i @ delta
    o = torch.stack(outs)  # (N, B, H, C, V)
    return o.permute(1, 0, 3, 2, 4).reshape(bsz, -1, h, vdim)[:, :t]
