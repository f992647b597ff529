"""The gated delta rule: chunked and recurrent forms against the naive float32 reference, and the
reference against transformers' own torch functions.

Every check compares outputs and final state with a relative error bound and names the tensor
that failed. `gate` is "head" (g (B, T, H), Gated DeltaNet) or "channel" (g (B, T, H, K), KDA).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prfaas.model.ops.delta_rule import chunk_delta_rule, naive_delta_rule, recurrent_delta_step

FP32_TOL = 1e-4
TOL = {torch.float32: (FP32_TOL, FP32_TOL), torch.bfloat16: (1e-2, 1e-4)}  # (output, state)

# (B, T, H, K, V): T = 1, shorter than a chunk, not a multiple of it, several chunks.
SHAPES = [
    (1, 1, 2, 16, 16),
    (2, 37, 3, 32, 16),
    (1, 64, 2, 16, 32),
    (2, 130, 2, 64, 64),
    (1, 257, 4, 32, 32),
]


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((ref - out).norm() / ref.norm().clamp_min(1e-12)).item()


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: not finite"
    err = rel_err(ref, out)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}"


def make_inputs(
    B: int, T: int, H: int, K: int, V: int, gate: str, dtype: torch.dtype = torch.float32,
    decay: float = 1.0, seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """q, k L2-normalised, beta in (0, 1), g in (-decay, 0]."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g_shape = (B, T, H, K) if gate == "channel" else (B, T, H)
    g = -decay * torch.rand(g_shape, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    return tuple(x.to(dtype) for x in (q, k, v, g, beta))


def decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor, scale: float, steps: range,
) -> torch.Tensor:
    """Run recurrent_delta_step over tokens `steps`, updating `state`; outputs (B, len(steps), H, V)."""
    outs = [recurrent_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, scale) for t in steps]
    return torch.stack(outs, dim=1)


def random_state(B: int, H: int, K: int, V: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gate", ["head", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}K{}V{}".format(*s))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_chunk_matches_naive(gate: str, dtype: torch.dtype, shape: tuple[int, ...], with_state: bool) -> None:
    B, T, H, K, V = shape
    q, k, v, g, beta = make_inputs(*shape, gate, dtype)
    s0 = random_state(B, H, K, V) if with_state else None
    o_ref, s_ref = naive_delta_rule(q, k, v, g, beta, K**-0.5, s0)
    o, s = chunk_delta_rule(q, k, v, g, beta, K**-0.5, s0)
    assert o.dtype == dtype and s.dtype == torch.float32
    o_tol, s_tol = TOL[dtype]
    assert_close("o", o_ref, o, o_tol)
    assert_close("final_state", s_ref, s, s_tol)


@pytest.mark.parametrize("gate", ["head", "channel"])
@pytest.mark.parametrize("chunk_size", [16, 32, 64, 128])
def test_chunk_sizes(gate: str, chunk_size: int) -> None:
    q, k, v, g, beta = make_inputs(1, 150, 2, 32, 32, gate)
    o_ref, s_ref = naive_delta_rule(q, k, v, g, beta, 0.2)
    o, s = chunk_delta_rule(q, k, v, g, beta, 0.2, chunk_size=chunk_size)
    assert_close("o", o_ref, o, FP32_TOL)
    assert_close("final_state", s_ref, s, FP32_TOL)


@pytest.mark.parametrize("gate", ["head", "channel"])
@pytest.mark.parametrize("decay", [1e-3, 5.0, 30.0], ids=["weak", "strong", "extreme"])
def test_chunk_decay_strength(gate: str, decay: float) -> None:
    """g around -5 per step sums to -320 over a chunk of 64: e^320 must never be formed."""
    q, k, v, g, beta = make_inputs(2, 200, 2, 32, 16, gate, decay=decay)
    s0 = random_state(2, 2, 32, 16)
    o_ref, s_ref = naive_delta_rule(q, k, v, g, beta, 32**-0.5, s0)
    o, s = chunk_delta_rule(q, k, v, g, beta, 32**-0.5, s0)
    assert_close("o", o_ref, o, FP32_TOL)
    assert_close("final_state", s_ref, s, FP32_TOL)


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_chunk_mixed_decay_channels(gate: str) -> None:
    """Some heads (and, for KDA, channels) forget almost at once while others barely decay."""
    q, k, v, g, beta = make_inputs(1, 160, 4, 32, 32, gate)
    strength = torch.tensor([1e-3, 0.5, 8.0, 40.0]).view(1, 1, 4, *((1,) if gate == "channel" else ()))
    g = g * strength
    o_ref, s_ref = naive_delta_rule(q, k, v, g, beta, 0.3)
    o, s = chunk_delta_rule(q, k, v, g, beta, 0.3)
    assert_close("o", o_ref, o, FP32_TOL)
    assert_close("final_state", s_ref, s, FP32_TOL)


@pytest.mark.parametrize("gate", ["head", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recurrent_step_matches_naive(gate: str, dtype: torch.dtype) -> None:
    B, T, H, K, V = 3, 20, 2, 32, 16
    q, k, v, g, beta = make_inputs(B, T, H, K, V, gate, dtype)
    s0 = random_state(B, H, K, V)
    o_ref, s_ref = naive_delta_rule(q, k, v, g, beta, K**-0.5, s0)
    state = s0.clone()
    o = decode(q, k, v, g, beta, state, K**-0.5, range(T))
    assert o.dtype == dtype and state.dtype == torch.float32
    o_tol, s_tol = TOL[dtype]
    assert_close("o", o_ref, o, o_tol)
    assert_close("state (updated in place)", s_ref, state, s_tol)


@pytest.mark.parametrize("gate", ["head", "channel"])
@pytest.mark.parametrize("split", [1, 50, 64, 99])
def test_chunk_continues_from_state(gate: str, split: int) -> None:
    """Prefill in two pieces, the second starting from the first's state, equals one pass."""
    B, T, H, K, V = 2, 100, 2, 32, 32
    q, k, v, g, beta = make_inputs(B, T, H, K, V, gate)
    o_ref, s_ref = naive_delta_rule(q, k, v, g, beta, 0.25)
    o1, s1 = chunk_delta_rule(q[:, :split], k[:, :split], v[:, :split], g[:, :split], beta[:, :split], 0.25)
    o2, s2 = chunk_delta_rule(
        q[:, split:], k[:, split:], v[:, split:], g[:, split:], beta[:, split:], 0.25, initial_state=s1
    )
    assert_close("o (first piece)", o_ref[:, :split], o1, FP32_TOL)
    assert_close("o (second piece)", o_ref[:, split:], o2, FP32_TOL)
    assert_close("final_state", s_ref, s2, FP32_TOL)


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_chunk_then_decode(gate: str) -> None:
    """Prefill with the chunked form, then decode token by token from its state."""
    B, T, H, K, V = 2, 70, 2, 32, 16
    q, k, v, g, beta = make_inputs(B, T, H, K, V, gate)
    o_ref, s_ref = naive_delta_rule(q, k, v, g, beta, 0.25)
    _, state = chunk_delta_rule(q[:, :60], k[:, :60], v[:, :60], g[:, :60], beta[:, :60], 0.25)
    o = decode(q, k, v, g, beta, state, 0.25, range(60, T))
    assert_close("o (decoded)", o_ref[:, 60:], o, FP32_TOL)
    assert_close("state", s_ref, state, FP32_TOL)


@pytest.mark.parametrize("gate", ["head", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_heads_and_l2norm_in_kernel(gate: str, dtype: torch.dtype) -> None:
    """q and k on fewer heads than v (each key head serving H / Hk value heads), unnormalised and
    normalised in the op: chunked prefill and then decode steps against the naive rule on the
    normalised, expanded inputs."""
    B, T, Hk, H, K, V = 2, 75, 2, 6, 32, 16
    gen = torch.Generator().manual_seed(5)
    q = (3 * torch.randn(B, T, Hk, K, generator=gen)).to(dtype)
    k = (3 * torch.randn(B, T, Hk, K, generator=gen)).to(dtype)
    v = torch.randn(B, T, H, V, generator=gen).to(dtype)
    g = -torch.rand((B, T, H, K) if gate == "channel" else (B, T, H), generator=gen).to(dtype)
    beta = torch.rand(B, T, H, generator=gen).to(dtype)
    s0 = random_state(B, H, K, V)
    qn, kn = (F.normalize(x.float(), dim=-1, eps=1e-3).repeat_interleave(H // Hk, dim=2) for x in (q, k))
    o_ref, s_ref = naive_delta_rule(qn, kn, v.float(), g.float(), beta.float(), K**-0.5, s0)
    o, s = chunk_delta_rule(q[:, :60], k[:, :60], v[:, :60], g[:, :60], beta[:, :60], K**-0.5, s0, l2norm_qk=True)
    assert o.dtype == dtype
    o_tol, s_tol = TOL[dtype]
    assert_close("o (chunked)", o_ref[:, :60], o, o_tol)
    outs = [
        recurrent_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], s, K**-0.5, l2norm_qk=True)
        for t in range(60, T)
    ]
    assert_close("o (decoded)", o_ref[:, 60:], torch.stack(outs, dim=1), o_tol)
    assert_close("final_state", s_ref, s, s_tol)


def test_chunk_rejects_ungrouped_heads() -> None:
    q, k, v, g, beta = make_inputs(1, 8, 3, 16, 16, "head")
    with pytest.raises(ValueError, match="do not group"):
        chunk_delta_rule(q[:, :, :2], k[:, :, :2], v, g, beta, 0.25)


def test_inputs_left_untouched() -> None:
    q, k, v, g, beta = make_inputs(1, 64, 1, 16, 16, "channel")
    s0 = random_state(1, 1, 16, 16)
    before = [x.clone() for x in (q, k, v, g, beta, s0)]
    chunk_delta_rule(q, k, v, g, beta, 0.25, s0)
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    for name, x, y in zip(names, before, (q, k, v, g, beta, s0), strict=True):
        assert torch.equal(x, y), f"{name} was modified"


# The oracle: transformers' torch fallbacks (they scale q by K^-0.5 themselves).


def test_naive_and_chunk_match_transformers_gated_deltanet() -> None:
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    B, T, H, K, V = 2, 150, 4, 32, 64
    q, k, v, g, beta = make_inputs(B, T, H, K, V, "head", decay=2.0)
    s0 = random_state(B, H, K, V)
    o_hf, s_hf = torch_chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=64, initial_state=s0.clone(), output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )
    for form, fn in (("naive", naive_delta_rule), ("chunk", chunk_delta_rule)):
        o, s = fn(q, k, v, g, beta, K**-0.5, s0)
        assert_close(f"{form} o", o_hf, o, FP32_TOL)
        assert_close(f"{form} final_state", s_hf, s, FP32_TOL)


def test_naive_and_chunk_match_transformers_kimi_delta_attention() -> None:
    from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention

    B, T, H, K, V = 2, 150, 4, 32, 32
    q, k, v, g, beta = make_inputs(B, T, H, K, V, "channel", decay=2.0)
    s0 = random_state(B, H, K, V)
    o_hf, s_hf = chunk_kimi_delta_attention(
        q, k, v, g, beta, chunk_size=64, initial_state=s0.clone(), output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )
    for form, fn in (("naive", naive_delta_rule), ("chunk", chunk_delta_rule)):
        o, s = fn(q, k, v, g, beta, K**-0.5, s0)
        assert_close(f"{form} o", o_hf, o, FP32_TOL)
        assert_close(f"{form} final_state", s_hf, s, FP32_TOL)


def test_step_matches_transformers_kimi_recurrent() -> None:
    from transformers.models.kimi_linear.modeling_kimi_linear import recurrent_kimi_delta_attention

    B, H, K, V = 3, 2, 32, 32
    q, k, v, g, beta = make_inputs(B, 1, H, K, V, "channel")
    s0 = random_state(B, H, K, V)
    o_hf, s_hf = recurrent_kimi_delta_attention(
        q, k, v, g, beta, s0.clone(), output_final_state=True, use_qk_l2norm_in_kernel=False
    )
    state = s0.clone()
    o = recurrent_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, K**-0.5)
    assert_close("o", o_hf[:, 0], o, FP32_TOL)
    assert_close("state", s_hf, state, FP32_TOL)
