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


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
    """One token: x (B, C), weight (C, W); shifts x into conv_state (B, C, W - 1) in place.
    Returns y (B, C) in x's dtype."""
    window = torch.cat([conv_state.to(weight.dtype), x.to(weight.dtype).unsqueeze(-1)], dim=-1)  # (B, C, W)
    conv_state.copy_(window[:, :, 1:])
    return F.silu((window * weight).sum(-1)).to(x.dtype)
