"""Which node holds which prefix, under the storage rule for hybrid models.

Full-attention KV is block-level: any block-aligned prefix whose blocks a node holds can be reused.
Linear-attention state is request-level: it is reusable only at the exact length where it was saved.
So a node's usable hit is the longest block-aligned prefix whose full-attention blocks are ALL on
that node and at whose end that same node holds a linear-state checkpoint.

Blocks and checkpoints are named by the chained hashes of `prfaas.kv.prefix`; a checkpoint is
keyed by the hash of the block it ends. Plain, deterministic Python: no torch, no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prfaas.kv.prefix import block_hashes

_ByHash = dict[int, set[str]]      # block hash -> node ids
_ByNode = dict[str, set[int]]      # node id -> block hashes


class CacheEventKind(enum.Enum):
    BLOCK_STORED = "block_stored"        # full-attention block with this chained hash is held
    BLOCK_EVICTED = "block_evicted"
    STATE_STORED = "state_stored"        # a linear-state checkpoint at the end of this block hash
    STATE_EVICTED = "state_evicted"


@dataclass(frozen=True)
class CacheEvent:
    node_id: str
    kind: CacheEventKind
    block_hashes: tuple[int, ...]


class PrefixIndex:
    """block hash -> nodes holding the block; block hash -> nodes holding a state checkpoint there.

    `requires_state=False` is for models without linear-attention layers, where every block-aligned
    prefix of held blocks is usable.
    """

    def __init__(self, block_size: int, requires_state: bool = True) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.requires_state = requires_state
        self._block_nodes: _ByHash = {}
        self._state_nodes: _ByHash = {}
        self._node_blocks: _ByNode = {}
        self._node_states: _ByNode = {}

    # --- updates ---------------------------------------------------------------------------------
    def apply(self, event: CacheEvent) -> None:
        if event.kind is CacheEventKind.BLOCK_STORED:
            self._add(self._block_nodes, self._node_blocks, event.node_id, event.block_hashes)
        elif event.kind is CacheEventKind.BLOCK_EVICTED:
            self._remove(self._block_nodes, self._node_blocks, event.node_id, event.block_hashes)
        elif event.kind is CacheEventKind.STATE_STORED:
            self._add(self._state_nodes, self._node_states, event.node_id, event.block_hashes)
        elif event.kind is CacheEventKind.STATE_EVICTED:
            self._remove(self._state_nodes, self._node_states, event.node_id, event.block_hashes)
        else:  # pragma: no cover - the enum is closed
            raise ValueError(f"unknown cache event kind {event.kind!r}")

    def drop_node(self, node_id: str) -> None:
        """Forgets everything `node_id` holds (it left, or restarted with an empty cache)."""
        self._remove(self._block_nodes, self._node_blocks, node_id, list(self._node_blocks.get(node_id, ())))
        self._remove(self._state_nodes, self._node_states, node_id, list(self._node_states.get(node_id, ())))

    @staticmethod
    def _add(by_hash: _ByHash, by_node: _ByNode, node: str, hashes: Iterable[int]) -> None:
        held = by_node.setdefault(node, set())
        for h in hashes:
            by_hash.setdefault(h, set()).add(node)
            held.add(h)

    @staticmethod
    def _remove(by_hash: _ByHash, by_node: _ByNode, node: str, hashes: Iterable[int]) -> None:
        held = by_node.get(node)
        if held is None:
            return
        for h in hashes:
            nodes = by_hash.get(h)
            if nodes is not None:
                nodes.discard(node)
                if not nodes:
                    del by_hash[h]
            held.discard(h)
        if not held:
            del by_node[node]

    # --- queries ---------------------------------------------------------------------------------
    def match(self, token_ids: Sequence[int]) -> dict[str, int]:
        """Usable hit length in tokens per node, for nodes with a hit; see the module docstring."""
        return self.match_hashes(block_hashes(token_ids, self.block_size))

    def match_hashes(self, hashes: Sequence[int]) -> dict[str, int]:
        """Like `match`, for a prompt already hashed into its chain of full-block hashes."""
        hits: dict[str, int] = {}
        holding: set[str] | None = None       # nodes holding every block so far
        for i, h in enumerate(hashes):
            here = self._block_nodes.get(h, set())
            holding = set(here) if holding is None else holding & here
            if not holding:
                break
            with_state = holding if not self.requires_state else holding & self._state_nodes.get(h, set())
            for node in with_state:
                hits[node] = (i + 1) * self.block_size
        return hits

    def nodes(self) -> set[str]:
        return set(self._node_blocks) | set(self._node_states)

    def num_blocks(self, node_id: str) -> int:
        return len(self._node_blocks.get(node_id, ()))

    def num_states(self, node_id: str) -> int:
        return len(self._node_states.get(node_id, ()))
