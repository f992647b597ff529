"""Block and state-slot allocators: plain Python, no torch, deterministic.

Blocks carry reference counts so that a cached prefix can be shared by several requests; a
block returns to the free list when its last reference is dropped. Free blocks can be promised to
a request (the blocks its decoding will need later): a promise is not allocated yet but is kept
back from everyone else, so an admitted request never runs out of blocks mid-generation.
"""

from __future__ import annotations

import heapq
from collections import deque

from prfaas.errors import OutOfCapacity

__all__ = ["BlockAllocator", "SlotAllocator", "OutOfCapacity"]


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self.num_promised = 0

    @property
    def num_free(self) -> int:
        """Free blocks that are not promised: what a new request may take."""
        return len(self._free) - self.num_promised

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int, promised: bool = False) -> list[int]:
        """`n` free blocks; `promised=True` draws them from a promise made earlier."""
        if promised:
            if n > self.num_promised:
                raise ValueError(f"drawing {n} blocks from promises of {self.num_promised}")
            self.num_promised -= n
        elif n > self.num_free:
            raise OutOfCapacity(f"need {n} KV blocks, {self.num_free} of {self.num_blocks} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def promise(self, n: int) -> None:
        if n > self.num_free:
            raise OutOfCapacity(f"need {n} more KV blocks later, {self.num_free} of {self.num_blocks} free")
        self.num_promised += n

    def release_promise(self, n: int) -> None:
        if n > self.num_promised:
            raise ValueError(f"releasing {n} promised blocks of {self.num_promised}")
        self.num_promised -= n

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def refcount(self, block: int) -> int:
        return self._refs[block]


class SlotAllocator:
    """Linear-attention state slots, one per running request. The lowest free slot goes first,
    which keeps the running requests' slots packed: a decode batch whose slots form one run reads
    and updates its states in place instead of gathering and scattering them."""

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots))  # a heap
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfCapacity(f"all {self.num_slots} state slots are in use")
        s = heapq.heappop(self._free)
        self._used.add(s)
        return s

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"state slot {slot} freed twice")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)
