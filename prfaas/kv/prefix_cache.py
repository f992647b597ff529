"""A node's own prefix cache: full-attention blocks and linear-state checkpoints kept after their
request is done, so that a later prompt with the same prefix computes only its suffix.

The hybrid rule of the cache pool applies here too: a hit is the longest run of cached blocks
whose last block has a linear-state checkpoint. The cache holds one reference on each cached block
(the allocator's refcount) and owns its checkpoint slots; eviction is least recently used, states
first; a block's eviction takes every checkpoint that needs it along (never a checkpoint without all
its blocks); it returns the events the node publishes to the cache pool. Plain Python, no torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from prfaas.kv.allocator import BlockAllocator, SlotAllocator
from prfaas.kv.prefix_index import CacheEvent, CacheEventKind


class PrefixCache:
    def __init__(self, node_id: str, blocks: BlockAllocator, slots: SlotAllocator, max_states: int = 8) -> None:
        self.node_id, self._blocks, self._slots = node_id, blocks, slots
        self.max_states = max_states
        self.blocks: OrderedDict[int, int] = OrderedDict()  # block hash -> block id (least recent first)
        self.states: OrderedDict[int, int] = OrderedDict()  # hash of a checkpoint's last block -> slot
        self._chains: dict[int, tuple[int, ...]] = {}  # a checkpoint's hash -> every block hash it needs

    def lookup(self, hashes: Sequence[int], max_blocks: int) -> tuple[list[int], int | None]:
        """The cached block ids of the longest usable prefix of at most `max_blocks` blocks, and the
        slot of the state checkpoint at its end; ([], None) on a miss."""
        best = 0
        for n in range(1, min(len(hashes), max_blocks) + 1):
            if hashes[n - 1] not in self.blocks:
                break
            if hashes[n - 1] in self.states:
                best = n
        if best == 0:
            return [], None
        for h in hashes[:best]:
            self.blocks.move_to_end(h)
        self.states.move_to_end(hashes[best - 1])
        return [self.blocks[h] for h in hashes[:best]], self.states[hashes[best - 1]]

    def insert(self, hashes: Sequence[int], block_ids: Sequence[int], state_slot: int) -> list[CacheEvent]:
        """Caches the blocks (taking a reference on each new one) and the checkpoint slot (owned
        from now on) at the end of `hashes`; returns the events to publish."""
        stored = []
        for h, b in zip(hashes, block_ids, strict=True):
            if h not in self.blocks:
                self._blocks.incref([b])
                self.blocks[h] = b
                stored.append(h)
            self.blocks.move_to_end(h)
        events = [CacheEvent(self.node_id, CacheEventKind.BLOCK_STORED, tuple(stored))] if stored else []
        last = hashes[-1]
        if last in self.states:
            self._slots.free(state_slot)
        else:
            self.states[last] = state_slot
            self._chains[last] = tuple(hashes)
            events.append(CacheEvent(self.node_id, CacheEventKind.STATE_STORED, (last,)))
        while len(self.states) > self.max_states:
            events += self._evict_state()
        return events

    def evict(self, blocks_needed: int, slots_needed: int) -> list[CacheEvent]:
        """Drops least recently used entries until the allocators can serve the request, or the
        cache is empty. Blocks still used by running requests only lose the cache's reference."""
        events: list[CacheEvent] = []
        while self.states and self._slots.num_free < slots_needed:
            events += self._evict_state()
        dropped = []
        while self.blocks and not self._blocks.can_allocate(blocks_needed):
            h, b = self.blocks.popitem(last=False)
            self._blocks.free([b])
            dropped.append(h)
        if dropped:
            events.append(CacheEvent(self.node_id, CacheEventKind.BLOCK_EVICTED, tuple(dropped)))
            gone = set(dropped)  # a checkpoint missing any of its blocks is of no use: its slot goes too
            for h in [h for h, chain in self._chains.items() if not gone.isdisjoint(chain)]:
                events += self._evict_state(h)
        return events

    def _evict_state(self, h: int | None = None) -> list[CacheEvent]:
        if h is None:
            h, slot = self.states.popitem(last=False)
        else:
            slot = self.states.pop(h)
        self._chains.pop(h, None)
        self._slots.free(slot)
        return [CacheEvent(self.node_id, CacheEventKind.STATE_EVICTED, (h,))]

    def inventory(self) -> list[CacheEvent]:
        """Everything held, as stored events (to publish again after re-registering)."""
        events = []
        if self.blocks:
            events.append(CacheEvent(self.node_id, CacheEventKind.BLOCK_STORED, tuple(self.blocks)))
        if self.states:
            events.append(CacheEvent(self.node_id, CacheEventKind.STATE_STORED, tuple(self.states)))
        return events
