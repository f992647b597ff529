"""A node's prefix cache: the hybrid hit rule, references on shared blocks, LRU eviction."""

from __future__ import annotations

from prfaas.kv.allocator import BlockAllocator, SlotAllocator
from prfaas.kv.prefix_cache import PrefixCache
from prfaas.kv.prefix_index import CacheEventKind


def make(num_blocks: int = 16, num_slots: int = 4, max_states: int = 8):
    blocks, slots = BlockAllocator(num_blocks), SlotAllocator(num_slots)
    return blocks, slots, PrefixCache("n", blocks, slots, max_states)


def test_hit_needs_blocks_and_a_state_at_their_end():
    blocks, slots, cache = make()
    ids = blocks.allocate(4)
    events = cache.insert([11, 12, 13, 14], ids, slots.allocate())
    assert [(e.kind, e.block_hashes) for e in events] == [
        (CacheEventKind.BLOCK_STORED, (11, 12, 13, 14)),
        (CacheEventKind.STATE_STORED, (14,)),
    ]
    assert cache.lookup([11, 12, 13, 14, 15], max_blocks=8) == (ids, cache.states[14])
    assert cache.lookup([11, 12, 13], max_blocks=8) == ([], None), "no checkpoint after block 3"
    assert cache.lookup([11, 12, 13, 14], max_blocks=3) == ([], None), "the hit must leave tokens to compute"
    assert cache.lookup([99, 12, 13, 14], max_blocks=8) == ([], None)


def test_cache_holds_a_reference_and_gives_it_back():
    blocks, slots, cache = make()
    ids = blocks.allocate(2)
    cache.insert([1, 2], ids, slots.allocate())
    blocks.free(ids)  # the request that computed them is done
    assert blocks.num_free == 14 and all(blocks.refcount(b) == 1 for b in ids)
    events = cache.evict(blocks_needed=16, slots_needed=4)
    assert blocks.num_free == 16 and slots.num_free == 4
    assert {e.kind for e in events} == {CacheEventKind.BLOCK_EVICTED, CacheEventKind.STATE_EVICTED}


def test_eviction_is_least_recently_used_and_a_second_checkpoint_is_not_kept_twice():
    blocks, slots, cache = make(num_blocks=4, num_slots=4)
    a, b = blocks.allocate(2), blocks.allocate(2)
    cache.insert([1, 2], a, slots.allocate())
    cache.insert([3, 4], b, slots.allocate())
    blocks.free(a + b)
    cache.lookup([1, 2, 9], max_blocks=2)  # touches prefix 1-2: 3-4 is now the oldest
    events = cache.evict(blocks_needed=1, slots_needed=0)
    assert 1 in cache.blocks and 2 in cache.blocks and 3 not in cache.blocks
    assert list(cache.states) == [2], "the checkpoint after 3-4 went with block 3"
    assert (CacheEventKind.STATE_EVICTED, (4,)) in [(e.kind, e.block_hashes) for e in events]
    slot = slots.allocate()
    events = cache.insert([1, 2], a, slot)
    assert events == [] and slots.num_free == 3, "the duplicate checkpoint slot is returned"


def test_checkpoints_are_capped():
    blocks, slots, cache = make(num_blocks=8, num_slots=8, max_states=2)
    for h in range(3):
        cache.insert([100 + h], blocks.allocate(1), slots.allocate())
    assert list(cache.states) == [101, 102] and slots.num_free == 6
    assert {e.kind for e in cache.inventory()} == {CacheEventKind.BLOCK_STORED, CacheEventKind.STATE_STORED}


def test_no_checkpoint_outlives_any_of_its_blocks():
    blocks, slots, cache = make(num_blocks=6, num_slots=4)
    ids = blocks.allocate(4)
    cache.insert([1, 2], ids[:2], slots.allocate())        # checkpoint after block 2
    cache.insert([1, 2, 3, 4], ids, slots.allocate())      # and after block 4, sharing 1-2
    blocks.free(ids)
    cache.lookup([1, 2, 3, 4, 5], max_blocks=4)            # 1-4 recent; then 1 is touched least recently...
    cache.blocks.move_to_end(2), cache.blocks.move_to_end(3), cache.blocks.move_to_end(4)
    events = cache.evict(blocks_needed=3, slots_needed=0)  # ... and block 1 goes first
    assert 1 not in cache.blocks and not cache.states, "both checkpoints needed block 1"
    assert slots.num_free == 4
    kinds = [(e.kind, e.block_hashes) for e in events]
    assert (CacheEventKind.BLOCK_EVICTED, (1,)) in kinds
    assert {h for k, hs in kinds if k is CacheEventKind.STATE_EVICTED for h in hs} == {2, 4}
