"""What the executor hands every layer on each forward: batch metadata and this layer's cache.

Layers read and write the cache tensors they are given (views of the executor's pools) at
the positions the metadata names; they never allocate blocks or slots themselves.

Tokens of all sequences in a step are packed along one dimension, `T = sum(query_lens)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch

from prfaas.model.layers import rotary_cos_sin
from prfaas.model.ops.attention import AttentionBackend, TorchAttention


@dataclass
class ForwardMeta:
    positions: torch.Tensor          # (T,) int64: absolute position of each token
    query_lens: list[int]            # new tokens per sequence; sum == T
    context_lens: list[int]          # tokens per sequence after this step (cached + new)
    block_tables: list[torch.Tensor]  # per sequence: (num_blocks_i,) int64 block ids
    slot_mapping: torch.Tensor       # (T,) int64: flat index block_id * block_size + offset
    state_slots: list[int]           # per sequence: its linear-state slot
    attn: AttentionBackend = field(default_factory=TorchAttention)
    # prefill: per sequence, (offset in its new tokens, slot) pairs: the linear layers copy their
    # states as they stand after that many tokens into the slot (a prefix-cache checkpoint)
    snapshots: list[tuple[tuple[int, int], ...]] = field(default_factory=list)
    # training (prfaas/model/train_forward.py): linear layers take an autograd-friendly path from a zero
    # state and leave their cache untouched; every sequence the same length, nothing cached
    differentiable: bool = False

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @cached_property
    def padded_block_tables(self) -> torch.Tensor:
        """(B, max_blocks) int64, rows padded with their own first block (masked by length)."""
        n = max(len(t) for t in self.block_tables)
        rows = [torch.cat((t, t[:1].expand(n - len(t)))) if len(t) < n else t for t in self.block_tables]
        return torch.stack(rows)

    @cached_property
    def context_lens_tensor(self) -> torch.Tensor:
        return torch.tensor(self.context_lens, dtype=torch.long, device=self.positions.device)

    def rotary(self, rotary_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, rotary_dim) of this step's positions, computed once for all layers."""
        key = (rotary_dim, theta, dtype)
        memo = self.__dict__.setdefault("_rotary", {})
        if key not in memo:
            memo[key] = rotary_cos_sin(self.positions, rotary_dim, theta, dtype)
        return memo[key]  # type: ignore[no-any-return]

    def seq_ranges(self) -> list[tuple[int, int]]:
        """(start, end) of each sequence's tokens in the packed dimension."""
        out, start = [], 0
        for n in self.query_lens:
            out.append((start, start + n))
            start += n
        return out


class FullAttnCache(Protocol):
    """What a full-attention layer reads and writes: its paged pool. GQA: k and v,
    (num_blocks, block_size, Hkv, D). MLA: k is the latent (num_blocks, block_size, R + P) and v
    is None. (The KV layout allocates it: `prfaas.kv.layout.PagedCache`.)"""

    k: torch.Tensor
    v: torch.Tensor | None


class LinearStateCache(Protocol):
    """What a linear-attention layer reads and writes: its state slots, recurrent
    (num_slots, H, K, V) float32 and conv (num_slots, conv_dim, kernel - 1). A layer starts a
    sequence from the state in its slot. (The KV layout allocates it: `prfaas.kv.layout.StateCache`.)"""

    recurrent: torch.Tensor
    conv: torch.Tensor


LayerCache = FullAttnCache | LinearStateCache
