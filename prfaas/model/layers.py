"""Building blocks shared by both families: norms, the SwiGLU MLP, rotary embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. `zero_centered` (Qwen3-Next) scales by (1 + weight) and
    casts after the product; the plain form (Kimi-Linear) casts before multiplying the weight."""

    def __init__(self, dim: int, eps: float, zero_centered: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """norm(x) * act(gate), per head. Qwen3-Next gates with SiLU and casts x back before the
    weight; Kimi-Linear gates with sigmoid and keeps everything in float32."""

    def __init__(self, dim: int, eps: float, activation: str) -> None:
        super().__init__()
        self.eps = eps
        self.activation = activation
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.activation == "silu":
            y = self.weight * xf.to(dtype)
            return (y * F.silu(gate.float())).to(dtype)
        y = self.weight.float() * xf
        return (y * torch.sigmoid(gate.float())).to(dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.ModuleList):
    """Routed experts, each a SwiGLU MLP. A ModuleList so that checkpoints load with their
    per-expert names (`experts.{i}.gate_proj.weight`). A plain loop over the experts that
    received tokens: fine on CPU, and the seam for a grouped-GEMM kernel later."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__(MLP(hidden, intermediate) for _ in range(num_experts))

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """x (T, D); top_idx, top_w (T, k). Returns (T, D)."""
        out = torch.zeros_like(x)
        flat_idx = top_idx.reshape(-1)
        order = torch.argsort(flat_idx, stable=True)
        counts = torch.bincount(flat_idx, minlength=len(self)).tolist()
        token_of = order // top_idx.shape[1]
        weight_of = top_w.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = token_of[start : start + n]
            y = self[e](x.index_select(0, tok)) * weight_of[start : start + n, None].to(x.dtype)
            out.index_add_(0, tok, y)
            start += n
        return out


def rotary_cos_sin(
    positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, rotary_dim) for the half-rotation (rotate_half) convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, rotary_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D); rotates the first rotary_dim channels, passes the rest through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat((out, rest), dim=-1)
