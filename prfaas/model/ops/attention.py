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


def gather_padded(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """The contexts of B sequences at once: block_tables (B, max_blocks), padded with any valid
    block id -> (B, max_blocks * block_size, *token_shape). Mask positions past each length."""
    b, n = block_tables.shape
    blocks = cache.index_select(0, block_tables.reshape(-1))  # (B * n, block_size, *token_shape)
    return blocks.view(b, n * cache.shape[1], *cache.shape[2:])


class AttentionBackend(Protocol):
    name: str

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention of one sequence. q (T, Hq, D), k (S, Hkv, D), v (S, Hkv, Dv), with
        the queries at the last T of the S positions; Hq a multiple of Hkv. Returns (T, Hq, Dv)."""
        ...

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """One new token per sequence over the paged pool. q (B, Hq, D); caches (num_blocks,
        block_size, Hkv, D|Dv); block_tables (B, max_blocks); context_lens (B,) including the new
        token, whose KV is already stored. Returns (B, Hq, Dv)."""
        ...


class TorchAttention:
    """Reference backend on scaled_dot_product_attention. Tensors go in 4-D (1, H, T, D) with
    grouped heads, which lets torch pick its fused CPU kernel (several times faster than the
    3-D form); a value head narrower than the key head is zero-padded for the same reason."""

    name = "torch"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        t, s, dv = q.shape[0], k.shape[0], v.shape[-1]
        if dv < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - dv))
        qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, T|S, D)
        gqa = kh.shape[1] != qh.shape[1]
        if t == 1 or t == s:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=t > 1, scale=scale, enable_gqa=gqa)
        else:
            # queries sit at positions s-t .. s-1: token i may see keys 0 .. s-t+i
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)[..., :dv]  # (T, Hq, Dv)

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        k = gather_padded(k_cache, block_tables).transpose(1, 2)  # (B, Hkv, S, D)
        v = gather_padded(v_cache, block_tables).transpose(1, 2)
        visible = torch.arange(k.shape[2], device=q.device)[None, :] < context_lens[:, None]  # (B, S)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
        return out[:, :, 0]  # (B, Hq, Dv)
