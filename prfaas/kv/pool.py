"""The KV pool: one tensor per `TensorSpec` of the layout, addressed by blocks (paged specs) or by
state slots (per-request specs). It knows specs, not layer kinds: the layout says which is which.

    pool = layout.allocate(num_blocks, num_slots)
    pool.layer_caches[i]                     # what layer i's mixer reads and writes
    pool.read(spec, block_table, slot, a, b) # a copy: tokens [a, b) of a paged tensor, or the state
    pool.write(spec, block_table, slot, a, b, tensor)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from prfaas.kv.kinds import KvKind

if TYPE_CHECKING:
    from prfaas.kv.layout import KvLayout, LayerCache, TensorSpec


@dataclass
class LayerKv:
    """One layer's KV after computing tokens [token_start, token_end) of a request: the paged
    tensors' new tokens `(token_end - token_start, *shape)` and the per-request states as they
    stand after `token_end`. Tensors are copies, owned by the holder."""

    layer: int
    token_start: int
    token_end: int
    tensors: dict[KvKind, torch.Tensor] = field(default_factory=dict)


class KvPool:
    def __init__(self, layout: KvLayout, num_blocks: int, num_slots: int, device: str | torch.device = "cpu") -> None:
        self.layout, self.device = layout, torch.device(device)
        self.num_blocks, self.num_slots = num_blocks, num_slots
        self.tensors: dict[tuple[int, KvKind], torch.Tensor] = {}
        for s in layout.specs:
            rows = (num_blocks, layout.block_size) if s.paged else (num_slots,)
            self.tensors[(s.layer, s.kind)] = torch.zeros((*rows, *s.shape), dtype=s.dtype, device=self.device)
        self.layer_caches: list[LayerCache] = [
            layout.layer_cache(i, {s.kind: self.tensors[(i, s.kind)] for s in layout.layer_specs(i)})
            for i in range(layout.num_layers)
        ]

    def tensor(self, spec: TensorSpec) -> torch.Tensor:
        return self.tensors[(spec.layer, spec.kind)]

    # --- per-request states ------------------------------------------------------------------------
    def zero_states(self, slot: int) -> None:
        for s in self.layout.state_specs:
            self.tensor(s)[slot].zero_()

    def copy_states(self, src: int, dst: int) -> None:
        for s in self.layout.state_specs:
            t = self.tensor(s)
            t[dst].copy_(t[src])

    # --- one tensor of one request -----------------------------------------------------------------
    def _flat_slots(self, block_table: Sequence[int], start: int, end: int) -> torch.Tensor:
        bs = self.layout.block_size
        if start < 0 or end > len(block_table) * bs:
            raise IndexError(f"tokens [{start}, {end}) are outside the {len(block_table)} reserved blocks")
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return (table[pos // bs] * bs + pos % bs).to(self.device)

    def read(self, spec: TensorSpec, block_table: Sequence[int], slot: int, start: int, end: int) -> torch.Tensor:
        """A copy of tokens [start, end) of a paged tensor, or of the request's state."""
        t = self.tensor(spec)
        if not spec.paged:
            return t[slot].clone()
        bs = self.layout.block_size
        first, last = start // bs, -(-end // bs)
        table = torch.tensor(block_table[first:last], dtype=torch.long, device=self.device)
        blocks = t.index_select(0, table).reshape(-1, *spec.shape)  # (tokens of those blocks, *shape)
        return blocks[start - first * bs : end - first * bs]

    def write(
        self, spec: TensorSpec, block_table: Sequence[int], slot: int, start: int, end: int, tensor: torch.Tensor
    ) -> None:
        """Writes tokens [start, end) of a paged tensor, or the whole state, of one request."""
        t = self.tensor(spec)
        if not spec.paged:
            t[slot].copy_(tensor)
            return
        t.view(-1, *spec.shape).index_copy_(0, self._flat_slots(block_table, start, end), tensor.to(spec.dtype))
