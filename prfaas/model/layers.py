"""Building blocks shared by both families: norms, the SwiGLU MLP, rotary embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_inv(xf: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim of a float32 tensor, (..., 1): one read of x
    (pow and mean would write and read a squared copy)."""
    return torch.linalg.vecdot(xf, xf).unsqueeze(-1).div_(xf.shape[-1]).add_(eps).rsqrt_()


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
        y = xf * rms_inv(xf, self.eps)
        if self.zero_centered:
            return y.mul_(1.0 + self.weight.float()).to(x.dtype)
        return self.weight * y.to(x.dtype)


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
        y = xf * rms_inv(xf, self.eps)
        if self.activation == "silu":
            if dtype != torch.float32:  # the cast before the weight, as the reference rounds
                y = y.to(dtype).float()
            y.mul_(self.weight.to(dtype).float())
            return y.mul_(F.silu(gate.float())).to(dtype)
        y.mul_(self.weight.float())
        return y.mul_(torch.sigmoid(gate.float())).to(dtype)


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
    per-expert names (`experts.{i}.gate_proj.weight`).

    Two ways to run them. Many tokens (prefill): a loop over the experts that received tokens,
    each a dense MLP on its tokens. Few tokens (decode): every expert on every token as three
    batched products over the stacked weights, then the routing weights select; more FLOPs, but
    one call instead of three small ones per expert. The stacked weights are the experts' own
    storage (their parameters become views of it), so nothing is held twice."""

    proj_names = ("gate_proj", "up_proj", "down_proj")
    dense_flops_limit = 64e6  # few-token path when T * E * 3 * I * D stays below this

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__(MLP(hidden, intermediate) for _ in range(num_experts))

    def _projs(self, i: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        e = self[i]
        return tuple(getattr(e, n) for n in self.proj_names)  # type: ignore[return-value]

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """gate/up as one (E, 2, I, D) tensor and down as (E, I, D); the experts' own weights
        become views of them (down transposed), so the packing costs no memory."""
        packed = getattr(self, "_packed", None)
        if packed is None or packed[0][0, 0].data_ptr() != self._projs(0)[0].weight.data_ptr():
            with torch.no_grad():
                e = len(self)
                gu = torch.stack([torch.stack([self._projs(i)[j].weight for j in (0, 1)]) for i in range(e)])
                dn = torch.stack([self._projs(i)[2].weight.t() for i in range(e)]).contiguous()
                for i in range(e):
                    gate, up, down = self._projs(i)
                    gate.weight = nn.Parameter(gu[i, 0], requires_grad=False)
                    up.weight = nn.Parameter(gu[i, 1], requires_grad=False)
                    down.weight = nn.Parameter(dn[i].t(), requires_grad=False)
            packed = self._packed = (gu, dn)
        return packed  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """x (T, D); top_idx, top_w (T, k). Returns (T, D)."""
        e = len(self)
        gate0 = self._projs(0)[0].weight
        if x.shape[0] * e * 3 * gate0.numel() <= self.dense_flops_limit:
            return self._forward_all(x, top_idx, top_w)
        out = torch.zeros_like(x)
        flat_idx = top_idx.reshape(-1)
        order = torch.argsort(flat_idx, stable=True)
        counts = torch.bincount(flat_idx, minlength=e).tolist()
        token_of = order // top_idx.shape[1]
        weight_of = top_w.reshape(-1)[order]
        start = 0
        for i, n in enumerate(counts):
            if n == 0:
                continue
            tok = token_of[start : start + n]
            y = self[i](x.index_select(0, tok)) * weight_of[start : start + n, None].to(x.dtype)
            out.index_add_(0, tok, y)
            start += n
        return out

    def _forward_all(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        gu, dn = self._stacked()  # (E, 2, I, D), (E, I, D)
        t, (e, _, i, d) = x.shape[0], gu.shape
        a = (x @ gu.view(e * 2 * i, d).t()).view(t, e, 2, i)
        w = torch.zeros(t, e, dtype=x.dtype, device=x.device)
        w.scatter_add_(1, top_idx, top_w.to(x.dtype))  # routing weights, zero for unselected experts
        h = F.silu(a[:, :, 0]) * a[:, :, 1] * w[:, :, None]  # (T, E, I)
        return h.reshape(t, e * i) @ dn.view(e * i, d)


def rotary_cos_sin(
    positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, rotary_dim) for the half-rotation (rotate_half) convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, rotary_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D); rotates the first rotary_dim channels, passes the rest through. In place on x
    when it is a tensor of our own (the caller's fresh q or k), which it returns."""
    rd = cos.shape[-1]
    half = rd // 2
    c, s = cos[:, None, :half], sin[:, None, :half]  # both halves of cos / sin are equal
    x1 = x[..., :half].clone()
    x2 = x[..., half:rd]
    x[..., :half].mul_(c).addcmul_(x2, s, value=-1.0)  # x1 cos - x2 sin
    x2.mul_(c).addcmul_(x1, s)  # x2 cos + x1 sin
    return x
