"""Full-attention ops over the paged pool: store new tokens, gather a sequence's context, attend.

`AttentionBackend` is the seam where GPU kernels (FlashInfer, flash-attn) plug in; the torch
implementation here is the reference and runs on CPU and GPU.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


def store_tokens(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """Writes `values` (T, *token_shape) into `cache` (num_blocks, block_size, *token_shape)
    at the flat slots `slot_mapping` (T,)."""
    flat = cache.view(-1, *cache.shape[2:])  # (num_blocks * block_size, *token_shape)
    flat.index_copy_(0, slot_mapping, values.to(cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Returns the first `length` tokens of a sequence whose blocks are `block_table`:
    (length, *token_shape)."""
    block_size = cache.shape[1]
    nblocks = -(-length // block_size)
    blocks = cache.index_select(0, block_table[:nblocks])  # (nblocks, block_size, *token_shape)
    return blocks.reshape(-1, *cache.shape[2:])[:length]


class AttentionBackend(Protocol):
    name: str

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Causal attention of one sequence. q (T, Hq, D), k (S, Hkv, D), v (S, Hkv, Dv), with
        the queries at the last T of the S positions; Hq a multiple of Hkv. Returns (T, Hq, Dv)."""
        ...


class TorchAttention:
    """Reference backend: scaled_dot_product_attention with an explicit causal offset."""

    name = "torch"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        t, s = q.shape[0], k.shape[0]
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, T|S, D)
        if kh.shape[0] != qh.shape[0]:
            rep = qh.shape[0] // kh.shape[0]
            kh = kh.repeat_interleave(rep, dim=0)
            vh = vh.repeat_interleave(rep, dim=0)
        if t == 1:
            out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
        elif t == s:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        else:
            # queries sit at positions s-t .. s-1: token i may see keys 0 .. s-t+i
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        return out.transpose(0, 1)  # (T, Hq, Dv)
