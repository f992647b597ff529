"""Simulated prefix caches: per node, an LRU over block keys with a capacity in blocks.

A request carries the keys of its full blocks (chained, as `prfaas.sim.trace.chain_keys` makes
them: equal keys are equal prefixes). A node's hit is the longest run of leading keys it holds,
times the block size; only full blocks are ever cached, as in the engine. Storing a prompt touches
its blocks from the last to the first, so the first blocks are the most recent and eviction takes a
prompt's tail before its head (a cached block is useless without the blocks before it).
Linear-state checkpoints are modelled as an interval: a hit is usable only at a multiple of
`checkpoint_tokens` (a multiple of the block size; the default, one block, makes every block boundary
usable, an upper bound on the engine's rule). Plain Python, deterministic.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


class BlockLRU:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self.capacity = capacity_blocks
        self.blocks: OrderedDict[int, None] = OrderedDict()   # least recent first
        self.evicted = 0

    def match(self, keys: Sequence[int]) -> int:
        """How many leading keys are cached (nothing is touched)."""
        n = 0
        for k in keys:
            if k not in self.blocks:
                break
            n += 1
        return n

    def store(self, keys: Sequence[int]) -> None:
        for k in reversed(keys):
            self.blocks[k] = None
            self.blocks.move_to_end(k)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
            self.evicted += 1


@dataclass
class PrefixCaches:
    """One `BlockLRU` per node, created on first use. With `decode_side`, decode nodes keep the
    prompts they decoded too, so an offloaded prefill sends only the KV the decode node lacks."""

    capacity_blocks: int
    block_tokens: int
    decode_side: bool = False
    checkpoint_tokens: int = 0          # 0: every block boundary
    nodes: dict[str, BlockLRU] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block_tokens <= 0:
            raise ValueError(f"block_tokens must be positive, got {self.block_tokens}")
        if self.checkpoint_tokens < 0 or self.checkpoint_tokens % self.block_tokens:
            raise ValueError(f"checkpoint_tokens must be a multiple of the block size {self.block_tokens}, "
                             f"got {self.checkpoint_tokens}")
        BlockLRU(self.capacity_blocks)   # validates the capacity

    def _lru(self, node_id: str) -> BlockLRU:
        lru = self.nodes.get(node_id)
        if lru is None:
            lru = self.nodes[node_id] = BlockLRU(self.capacity_blocks)
        return lru

    def hit_tokens(self, node_id: str, keys: Sequence[int]) -> int:
        hit = self._lru(node_id).match(keys) * self.block_tokens
        return hit - hit % self.checkpoint_tokens if self.checkpoint_tokens else hit

    def store(self, node_id: str, keys: Sequence[int]) -> None:
        if keys:
            self._lru(node_id).store(keys)
