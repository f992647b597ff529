"""Our C kernel for the delta rule (prfaas/model/ops/csrc/delta_rule.c) against the naive float32
reference: both gate kinds, grouped key heads, in-kernel normalisation, strided inputs, a carried
state, decays from weak to extreme, several head sizes (the specialised and the generic builds),
and the thread split over heads. Skipped where the machine has no C compiler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from prfaas.model.ops import cpu_kernel
from prfaas.model.ops.delta_rule import chunk_delta_rule, naive_delta_rule

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler for the CPU kernel")

TOL = 1e-5


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((ref.double() - out.double()).norm() / ref.double().norm().clamp_min(1e-12))


def inputs(T, Hk, H, K, V, gate, decay=1.0, seed=0, l2norm=True):
    gen = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(T, Hk, K, generator=gen)
    k = 2 * torch.randn(T, Hk, K, generator=gen)
    if not l2norm:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = torch.randn(T, H, V, generator=gen)
    g = -decay * torch.rand((T, H, K) if gate == "channel" else (T, H), generator=gen)
    beta = torch.rand(T, H, generator=gen)
    state = torch.randn(H, K, V, generator=gen)
    return q, k, v, g, beta, state


def reference(q, k, v, g, beta, state, scale, l2norm):
    H, Hk = v.shape[1], q.shape[1]
    if l2norm:
        q, k = (x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
    q, k = (x.repeat_interleave(H // Hk, dim=1) for x in (q, k))
    o, s = naive_delta_rule(q[None], k[None], v[None], g[None], beta[None], scale, state[None].clone())
    return o[0], s[0]


@pytest.mark.parametrize("gate", ["head", "channel"])
@pytest.mark.parametrize(
    "dims",
    [
        (1, 2, 4, 64, 64),
        (37, 2, 4, 64, 64),
        (70, 1, 3, 32, 32),
        (50, 2, 2, 128, 128),
        (33, 2, 4, 24, 40),  # the generic build, V not a multiple of the register block
        (9, 1, 1, 16, 48),
    ],
    ids=lambda d: "T{}Hk{}H{}K{}V{}".format(*d),
)
@pytest.mark.parametrize("l2norm", [True, False])
def test_kernel_matches_naive(gate, dims, l2norm):
    T, Hk, H, K, V = dims
    q, k, v, g, beta, s0 = inputs(T, Hk, H, K, V, gate, l2norm=l2norm)
    o_ref, s_ref = reference(q, k, v, g, beta, s0, K**-0.5, l2norm)
    state = s0.clone()
    o = cpu_kernel.delta_rule(q, k, v, g, beta, K**-0.5, state, l2norm_qk=l2norm)
    assert o.shape == (T, H, V) and o.dtype == torch.float32
    assert rel_err(o_ref, o) < TOL, f"o: relative error {rel_err(o_ref, o):.3g}"
    assert rel_err(s_ref, state) < TOL, f"state (updated in place): relative error {rel_err(s_ref, state):.3g}"


@pytest.mark.parametrize("gate", ["head", "channel"])
@pytest.mark.parametrize("decay", [1e-3, 5.0, 40.0], ids=["weak", "strong", "extreme"])
def test_kernel_decay_strength(gate, decay):
    q, k, v, g, beta, s0 = inputs(200, 2, 4, 64, 64, gate, decay=decay)
    o_ref, s_ref = reference(q, k, v, g, beta, s0, 0.125, True)
    state = s0.clone()
    o = cpu_kernel.delta_rule(q, k, v, g, beta, 0.125, state, l2norm_qk=True)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    assert rel_err(o_ref, o) < TOL
    assert rel_err(s_ref, state) < 1e-4


def test_kernel_reads_column_slices_in_place():
    """q, k, v as views into one wide token-major tensor (the conv output), as the model passes
    them; and bf16 inputs, which the kernel reads as float32."""
    T, Hk, H, K, V = 45, 2, 4, 64, 64
    wide = torch.randn(T, 2 * Hk * K + H * V + 7)
    q = wide[:, : Hk * K].view(T, Hk, K)
    k = wide[:, Hk * K : 2 * Hk * K].view(T, Hk, K)
    v = wide[:, 2 * Hk * K : 2 * Hk * K + H * V].view(T, H, V)
    g, beta = -torch.rand(T, H), torch.rand(T, H)
    o_ref, s_ref = reference(q, k, v, g, beta, torch.zeros(H, K, V), 0.2, True)
    state = torch.zeros(H, K, V)
    o = cpu_kernel.delta_rule(q, k, v, g, beta, 0.2, state, l2norm_qk=True)
    assert rel_err(o_ref, o) < TOL and rel_err(s_ref, state) < TOL
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    o_ref, _ = reference(qb.float(), kb.float(), vb.float(), g, beta, torch.zeros(H, K, V), 0.2, True)
    o = cpu_kernel.delta_rule(qb, kb, vb, g, beta, 0.2, torch.zeros(H, K, V), l2norm_qk=True)
    assert rel_err(o_ref, o) < TOL


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_same_for_any_thread_split(threads):
    q, k, v, g, beta, s0 = inputs(64, 2, 6, 32, 32, "head")
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            state = s0.clone()
            outs.append((cpu_kernel.delta_rule(q, k, v, g, beta, 0.3, state, l2norm_qk=True), state))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), "heads are independent"


def test_kernel_continues_like_chunked_prefill():
    """Two calls on one state equal one call on the whole sequence, and the chunked torch form."""
    q, k, v, g, beta, _ = inputs(90, 2, 4, 64, 64, "head")
    whole = torch.zeros(4, 64, 64)
    o_whole = cpu_kernel.delta_rule(q, k, v, g, beta, 0.125, whole, l2norm_qk=True)
    split = torch.zeros(4, 64, 64)
    o1 = cpu_kernel.delta_rule(q[:33], k[:33], v[:33], g[:33], beta[:33], 0.125, split, l2norm_qk=True)
    o2 = cpu_kernel.delta_rule(q[33:], k[33:], v[33:], g[33:], beta[33:], 0.125, split, l2norm_qk=True)
    assert torch.allclose(torch.cat([o1, o2]), o_whole, rtol=0, atol=1e-6)
    assert torch.allclose(split, whole, rtol=0, atol=1e-6)
    o_c, s_c = chunk_delta_rule(q[None], k[None], v[None], g[None], beta[None], 0.125, l2norm_qk=True)
    assert rel_err(o_c[0], o_whole) < 1e-4 and rel_err(s_c[0], whole) < 1e-4


def test_kernel_rejects_bad_arguments():
    q, k, v, g, beta, s0 = inputs(4, 2, 4, 64, 64, "head")
    with pytest.raises(ValueError, match="state must be float32"):
        cpu_kernel.delta_rule(q, k, v, g, beta, 0.1, s0.double())
    with pytest.raises(ValueError, match="unsupported shapes"):
        cpu_kernel.delta_rule(q[:, :, :32], k, v, g, beta, 0.1, s0)
    with pytest.raises(ValueError, match="unsupported shapes"):
        cpu_kernel.delta_rule(q, k, v[:, :3], g[:, :3], beta[:, :3], 0.1, s0[:3])
    # the C code indexes by these: fewer tokens in v, g or beta than in q must not reach it
    for bad in ((v[:3], g, beta), (v, g[:3], beta), (v, g, beta[:3]), (v, g[:, :, None].expand(4, 4, 8), beta)):
        with pytest.raises(ValueError, match="unsupported shapes"):
            cpu_kernel.delta_rule(q, k, *bad[:2], bad[2], 0.1, s0)
    with pytest.raises(ValueError, match="unsupported shapes"):
        cpu_kernel.delta_rule_decode(q, k, v[:3], g[:3], beta[:3], 0.1, s0[None].expand(4, 4, 64, 64), [0, 1, 2])


def test_kernel_can_be_turned_off():
    code = "from prfaas.model.ops import cpu_kernel; print(cpu_kernel.available())"
    env = {**os.environ, "PRFAAS_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_decode_kernel_updates_states_at_their_slots(gate):
    """One token for each of several sequences whose states sit at scattered slots of a pool:
    each matches the naive rule on its own, and no other slot is touched."""
    B, Hk, H, K, V, slots_n = 4, 2, 4, 64, 64, 9
    q, k, v, g, beta, _ = inputs(B, Hk, H, K, V, gate)
    pool = torch.randn(slots_n, H, K, V, generator=torch.Generator().manual_seed(3))
    before = pool.clone()
    slots = [7, 2, 5, 0]
    o = cpu_kernel.delta_rule_decode(q, k, v, g, beta, 0.125, pool, slots, l2norm_qk=True)
    for b, slot in enumerate(slots):
        o_ref, s_ref = reference(q[b : b + 1], k[b : b + 1], v[b : b + 1], g[b : b + 1], beta[b : b + 1],
                                 before[slot], 0.125, True)
        assert rel_err(o_ref[0], o[b]) < TOL, f"sequence {b}: output"
        assert rel_err(s_ref, pool[slot]) < TOL, f"sequence {b}: state at slot {slot}"
    untouched = [s for s in range(slots_n) if s not in slots]
    assert torch.equal(pool[untouched], before[untouched]), "a slot outside the batch changed"
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernel.delta_rule_decode(q, k, v, g, beta, 0.125, pool, [0, 1, 2, 9], l2norm_qk=True)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kernel_works_in_a_forked_child():
    """The worker threads do not survive a fork; a child that calls the kernel starts its own."""
    q, k, v, g, beta, s0 = inputs(20, 2, 4, 64, 64, "head")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = cpu_kernel.delta_rule(q, k, v, g, beta, 0.1, s0.clone(), l2norm_qk=True)  # pools exist now
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                o = cpu_kernel.delta_rule(q, k, v, g, beta, 0.1, s0.clone(), l2norm_qk=True)
                os.write(write, b"1" if torch.equal(o, expected) else b"0")
            finally:
                os._exit(0)
        os.close(write)
        deadline = time.monotonic() + 30
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the kernel hung in a forked child (its worker pool came from the parent)")
            time.sleep(0.05)
        assert os.read(read, 1) == b"1", "the child's result differs"
        os.close(read)
    finally:
        torch.set_num_threads(before)
