"""Shared layers: the two expert paths agree; attention's fused and paged forms agree with a
plain softmax reference."""

from __future__ import annotations

import pytest
import torch

from prfaas.model.layers import Experts
from prfaas.model.ops.attention import TorchAttention, store_tokens


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_expert_paths_agree(tokens):
    torch.manual_seed(0)
    experts = Experts(6, 32, 48)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(tokens, 32)
    idx = torch.stack([torch.randperm(6)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2)
    looped = experts.forward.__func__  # type: ignore[attr-defined]
    experts.dense_flops_limit = 0  # the per-expert loop
    a = looped(experts, x, idx, w)
    experts.dense_flops_limit = float("inf")  # every expert on every token
    b = looped(experts, x, idx, w)
    ref = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(2):
            ref[t] += w[t, j] * experts[int(idx[t, j])](x[t : t + 1])[0]
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, ref, rtol=1e-5, atol=1e-5)
    assert experts[0].gate_proj.weight.data_ptr() == experts._packed[0][0].data_ptr(), "weights are not duplicated"


def reference_attention(q, k, v, scale):
    t, s = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


@pytest.mark.parametrize("t,s,dv", [(5, 5, 16), (1, 9, 16), (3, 11, 8), (40, 40, 12)])
def test_attend_matches_reference(t, s, dv):
    torch.manual_seed(1)
    q, k, v = torch.randn(t, 4, 16), torch.randn(s, 2, 16), torch.randn(s, 2, dv)
    out = TorchAttention().attend(q, k, v, 0.25)
    torch.testing.assert_close(out, reference_attention(q, k, v, 0.25), rtol=1e-5, atol=1e-5)


def test_paged_decode_matches_per_sequence():
    torch.manual_seed(2)
    bs, nblocks = 4, 16
    kc, vc = torch.zeros(nblocks, bs, 2, 8), torch.zeros(nblocks, bs, 2, 8)
    lens = [3, 9, 14]
    tables = [torch.tensor([5, 1, 7, 2]), torch.tensor([0, 3, 9]), torch.tensor([4, 6, 8, 10])]
    ks = [torch.randn(n, 2, 8) for n in lens]
    vs = [torch.randn(n, 2, 8) for n in lens]
    for table, k, v in zip(tables, ks, vs, strict=True):
        slots = torch.tensor([int(table[p // bs]) * bs + p % bs for p in range(k.shape[0])])
        store_tokens(kc, slots, k)
        store_tokens(vc, slots, v)
    q = torch.randn(3, 4, 8)
    padded = torch.stack([torch.cat((t, t[:1].expand(4 - len(t)))) for t in tables])
    out = TorchAttention().decode(q, kc, vc, padded, torch.tensor(lens), 0.3)
    for i in range(3):
        ref = reference_attention(q[i : i + 1], ks[i], vs[i], 0.3)[0]
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
