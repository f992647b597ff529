"""Short causal depthwise convolution with SiLU, run over the concatenated q/k/v channels.

The conv state of a sequence holds its last W - 1 inputs (B, C, W - 1), so a prompt can be
continued, or decoded one token at a time, exactly as if it had been run whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_prefill(
    x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, T), weight (C, W), conv_state (B, C, W - 1) or None (zeros).
    Returns (y (B, C, T) in x's dtype, new_state (B, C, W - 1): the last W - 1 inputs)."""
    B, C, T = x.shape
    W = weight.shape[-1]
    if conv_state is None:
        conv_state = x.new_zeros(B, C, W - 1)
    padded = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (B, C, W - 1 + T)
    y = F.conv1d(padded.to(weight.dtype), weight.unsqueeze(1), groups=C)  # (B, C, T)
    new_state = padded[:, :, padded.shape[-1] - (W - 1) :].to(conv_state.dtype)
    return F.silu(y).to(x.dtype), new_state


ROW_BLOCK = 256  # rows per block of the token-major conv: its taps stay in cache between passes


def causal_conv1d_tokens(
    x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill conv of one sequence in token-major layout, as the projections produce it:
    x (T, C) (may be a column slice of a wider projection), weight (C, W), conv_state (C, W - 1)
    or None (zeros). Returns (y (T, C) float32 after SiLU, new_state (C, W - 1) in the state's
    dtype, or x's without a state).

    Computed as W shifted multiply-adds in float32, a block of rows at a time, plus the state's
    share of the first W - 1 outputs: no padded copy and no transpose of x (conv1d on the
    transposed view reorders the whole input first and is several times slower). The taps are
    laid out (W, C) so that each broadcast operand is contiguous (a strided one halves the speed)."""
    T, C = x.shape
    W = weight.shape[-1]
    taps = weight.float().t().contiguous()  # (W, C): taps[W - 1 - s] multiplies the input s tokens back
    y = torch.empty(T, C, dtype=torch.float32, device=x.device)
    for t0 in range(0, T, ROW_BLOCK):
        t1 = min(T, t0 + ROW_BLOCK)
        h0 = max(0, t0 - (W - 1))  # the block's inputs, with the W - 1 before it
        xb = x[h0:t1].float()
        yb = y[t0:t1]
        torch.mul(xb[t0 - h0 :], taps[W - 1], out=yb)
        for s in range(1, W):
            lo = max(t0, s)  # the first row whose input s tokens back is in x
            if lo < t1:
                yb[lo - t0 :].addcmul_(xb[lo - s - h0 : t1 - s - h0], taps[W - 1 - s])
        if t0 == 0 and conv_state is not None:
            sf = conv_state.float()  # sf[:, j] is the input W - 1 - j tokens before x[0]
            for t in range(min(t1, W - 1)):
                yb[t] += (sf[:, t:] * weight[:, : W - 1 - t].float()).sum(-1)
        F.silu(yb, inplace=True)
    return y, conv_state_after(x, conv_state, W)


def conv_state_after(x: torch.Tensor, conv_state: torch.Tensor | None, width: int) -> torch.Tensor:
    """The conv state (C, width - 1) after the tokens x (T, C), from `conv_state` before them (None:
    zeros), in the state's dtype (x's without one): the last width - 1 inputs."""
    T, C = x.shape
    dtype = conv_state.dtype if conv_state is not None else x.dtype
    if T >= width - 1:
        return x[T - (width - 1) :].T.to(dtype)
    old = conv_state if conv_state is not None else x.new_zeros(C, width - 1)
    return torch.cat([old[:, T:].to(dtype), x.T.to(dtype)], dim=-1)


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
    """One token: x (B, C), weight (C, W); shifts x into conv_state (B, C, W - 1) in place.
    Returns y (B, C) in x's dtype."""
    window = torch.cat([conv_state.to(weight.dtype), x.to(weight.dtype).unsqueeze(-1)], dim=-1)  # (B, C, W)
    conv_state.copy_(window[:, :, 1:])
    return F.silu((window * weight).sum(-1)).to(x.dtype)
