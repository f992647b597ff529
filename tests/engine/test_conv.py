"""The short causal conv: prefill and step against transformers' torch versions and each other."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_next.modeling_qwen3_next import causal_conv1d_fn, causal_conv1d_update

from prfaas.model.ops.conv import causal_conv1d_prefill, causal_conv1d_step, causal_conv1d_tokens

B, C, W = 2, 24, 4
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = ((ref.double() - out.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}"


def make(T: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, T, generator=gen).to(dtype), torch.randn(C, W, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 3, 17])
def test_prefill_matches_transformers(dtype: torch.dtype, T: int) -> None:
    x, w = make(T, dtype)
    y, state = causal_conv1d_prefill(x, w)
    assert y.dtype == dtype
    assert_close("y", causal_conv1d_fn(x, w, activation="silu"), y, TOL[dtype])
    expected = torch.cat([torch.zeros(B, C, W - 1, dtype=dtype), x], dim=-1)[:, :, -(W - 1) :]
    assert torch.equal(state, expected), "new_state is not the last W - 1 inputs"


@pytest.mark.parametrize("split", [1, 2, 5, 9])
def test_prefill_continues_from_state(split: int) -> None:
    x, w = make(10, torch.float32)
    y_ref, state_ref = causal_conv1d_prefill(x, w)
    y1, s1 = causal_conv1d_prefill(x[:, :, :split], w)
    y2, s2 = causal_conv1d_prefill(x[:, :, split:], w, s1)
    assert_close("y", y_ref, torch.cat([y1, y2], dim=-1), 1e-6)
    assert torch.equal(s2, state_ref), "new_state after two pieces"


def test_short_prefill_keeps_old_state() -> None:
    """T < W - 1: the new state still holds inputs from before this call."""
    x, w = make(1, torch.float32)
    old = torch.randn(B, C, W - 1)
    _, state = causal_conv1d_prefill(x, w, old)
    assert torch.equal(state, torch.cat([old[:, :, 1:], x], dim=-1)), "new_state"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_transformers_update(dtype: torch.dtype) -> None:
    x, w = make(6, dtype)
    ours = torch.randn(B, C, W - 1).to(dtype)
    theirs = ours.clone()
    for t in range(x.shape[-1]):
        y = causal_conv1d_step(x[:, :, t], w, ours)
        y_ref = causal_conv1d_update(x[:, :, t : t + 1], theirs, w, activation="silu")[:, :, 0]
        assert y.dtype == dtype
        assert_close(f"y[{t}]", y_ref, y, TOL[dtype])
        assert torch.equal(ours, theirs), f"conv_state after step {t}"


def test_steps_equal_prefill() -> None:
    x, w = make(9, torch.float32)
    y_ref, state_ref = causal_conv1d_prefill(x, w)
    state = torch.zeros(B, C, W - 1)
    ys = [causal_conv1d_step(x[:, :, t], w, state) for t in range(x.shape[-1])]
    assert_close("y", y_ref, torch.stack(ys, dim=-1), 1e-6)
    assert torch.equal(state, state_ref), "conv_state"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 3, 4, 17, 300, 515])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
def test_token_major_matches_prefill(dtype: torch.dtype, T: int, with_state: bool) -> None:
    """causal_conv1d_tokens on (T, C) - a column slice of a wider tensor, as the projections give
    it - against causal_conv1d_prefill on (1, C, T), with and without a carried state."""
    x, w = make(T, dtype)
    x = x[:1]
    state = torch.randn(1, C, W - 1, generator=torch.Generator().manual_seed(3)).to(dtype) if with_state else None
    y_ref, s_ref = causal_conv1d_prefill(x, w, state)
    wide = torch.randn(T, 2 * C, dtype=dtype)
    wide[:, :C] = x[0].T
    y, s = causal_conv1d_tokens(wide[:, :C], w, None if state is None else state[0])
    assert y.dtype == torch.float32
    assert_close("y", y_ref[0].T.float(), y, 1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(s, s_ref[0]), "new_state is not the last W - 1 inputs"
