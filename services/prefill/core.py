"""The prefill node: runs a prompt layer by layer and pushes each finished layer's KV to the
decode node while the next layer computes. Stateless between requests: its blocks and slot are
freed when the push is done (or fails, or is cancelled).

No gRPC here: the KV sender is handed in as a factory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prfaas.engine.executor import Executor, LayerKv, Sequence
from prfaas.engine.sampling import SamplingParams
from prfaas.kv.allocator import OutOfCapacity
from prfaas.kv.prefix import block_hashes
from prfaas.kv.prefix_cache import PrefixCache
from prfaas.kv.prefix_index import CacheEvent
from prfaas.obs.log import get_logger

log = get_logger(__name__)


class KvPush(Protocol):
    async def push_layer(self, layer_kv: LayerKv) -> None: ...

    async def finish(self, first_token: int) -> dict[str, float]: ...

    async def abort(self) -> None: ...


@dataclass(frozen=True)
class PrefillJob:
    request_id: str
    transfer_id: str
    prompt: list[int]
    params: SamplingParams
    decode_address: str
    num_connections: int = 0
    wire_dtype: str = ""
    deadline_unix_s: float = 0.0


@dataclass(frozen=True)
class Started:
    node_id: str
    queue_wait_ms: int


@dataclass(frozen=True)
class Done:
    first_token: int
    kv_bytes: int
    prefill_s: float
    transfer_s: float
    chunks: int


SenderFactory = Callable[[PrefillJob], KvPush]


class PrefillNode:
    def __init__(
        self,
        node_id: str,
        executor: Executor,
        sender_factory: SenderFactory,
        compute_lock: asyncio.Lock | None = None,
        chunk_tokens: int = 0,
        prefix_cache: PrefixCache | None = None,
        grid_tokens: int = 0,
        on_cache_events: Callable[[list[CacheEvent]], None] | None = None,
        yield_between_chunks: bool = False,
    ) -> None:
        self.node_id, self.executor, self.sender_factory = node_id, executor, sender_factory
        # a convertible node shares the compute lock with its decode batch: between two chunks of a
        # prompt the lock is handed over (asyncio's lock is FIFO, so a waiting decode step goes
        # first), and a long prefill no longer stalls the node's decoding for its whole duration
        self.yield_between_chunks = yield_between_chunks
        if chunk_tokens & (chunk_tokens - 1):
            raise ValueError(f"chunk_tokens must be a power of two (the KV chunk grid), got {chunk_tokens}")
        # prefill long prompts in chunks of this many tokens, streaming each chunk's full-attention KV
        # while the next computes, so the tail after the last layer shrinks; 0 = whole prompt
        self.chunk_tokens = chunk_tokens
        # prefix reuse: checkpoints sit on multiples of `grid_tokens` (block size and KV chunk grid
        # both divide it), so a reused prefix never breaks the chunk grid of the KV stream
        if prefix_cache is not None and (grid_tokens <= 0 or grid_tokens % executor.layout.block_size):
            raise ValueError(f"grid_tokens {grid_tokens} must be a positive multiple of the block size")
        if prefix_cache is not None and chunk_tokens % grid_tokens:
            raise ValueError(f"chunk_tokens {chunk_tokens} must be a multiple of grid_tokens {grid_tokens}")
        self.prefix_cache, self.grid_tokens = prefix_cache, grid_tokens
        self.on_cache_events = on_cache_events or (lambda events: None)
        self.cached_tokens = 0  # prompt tokens served from the prefix cache so far
        # one prefill computes at a time, others queue; shared with a decode core on a convertible node
        self._compute = compute_lock or asyncio.Lock()
        self.queue_depth = 0
        self.running = 0
        self.bytes_sent = 0

    async def prefill(self, job: PrefillJob) -> AsyncGenerator[Started | Done, None]:
        ex = self.executor
        ex.validate(job.prompt, job.params)
        t_arrive = time.monotonic()
        self.queue_depth += 1
        try:
            await self._compute.acquire()
        finally:
            self.queue_depth -= 1
        self.running += 1
        locked = True
        seq = None
        sender: KvPush | None = None
        step: asyncio.Future[LayerKv | int | None] | None = None
        try:
            seq = self._add(job)
            hit, checkpoint_at, hashes = self._reuse_prefix(seq)
            yield Started(self.node_id, int((time.monotonic() - t_arrive) * 1000))
            sender = self.sender_factory(job)
            t0 = time.monotonic()
            first: int | None = None
            read_start: int | None = 0 if hit else None  # the decode side lacks the cached prefix too
            # Besides the checkpoint at the last grid boundary (the whole earlier prompt: a later turn
            # of the conversation hits it), one at the end of the first prompt chunk past the hit: a
            # prompt that shares only a shorter prefix with this one (a system prompt) hits there.
            early_at = hit + self.chunk_tokens if self.chunk_tokens and hit + self.chunk_tokens < checkpoint_at else 0
            while first is None:  # one pass per prompt chunk (and a stop at the checkpoint boundary)
                start, n = seq.num_cached, len(seq.prompt)
                until = checkpoint_at if start < checkpoint_at else None
                end = min(n, start + self.chunk_tokens) if self.chunk_tokens > 0 else n
                last_chunk = min(end, until or n) >= n
                steps = ex.prefill_layerwise(seq, self.chunk_tokens or None, until=until, read_start=read_start)
                read_start = None
                while True:
                    # compute runs off the event loop; shielded so a cancel never frees blocks under it
                    step = asyncio.ensure_future(asyncio.to_thread(_next_or_none, steps))
                    item = await asyncio.shield(step)
                    step = None
                    if item is None:  # this chunk's layers are done
                        break
                    if isinstance(item, int):
                        first = item
                    elif last_chunk or not item.is_state:
                        # queued; the sender streams while the next layer runs. A linear layer's state
                        # is only sent after the last chunk: the decode side takes it exactly once.
                        await sender.push_layer(item)
                if checkpoint_at and seq.num_cached == checkpoint_at:
                    self._checkpoint(seq, hashes[: checkpoint_at // ex.layout.block_size])
                elif hashes and seq.num_cached == early_at:
                    self._checkpoint(seq, hashes[: early_at // ex.layout.block_size])
                if first is None and self.yield_between_chunks:
                    self._compute.release()
                    locked = False
                    await self._compute.acquire()
                    locked = True
            prefill_s = time.monotonic() - t0
            self._compute.release()  # the next prompt may compute while this KV drains
            locked = False
            stats = await sender.finish(first)
            sender = None
            self.bytes_sent += int(stats.get("bytes", 0))
            log.info(
                "prefill_done",
                prompt_tokens=len(job.prompt),
                prefill_s=round(prefill_s, 4),
                kv_bytes=int(stats.get("bytes", 0)),
                transfer_s=round(float(stats.get("seconds", 0.0)), 4),
                chunks=int(stats.get("chunks", 0)),
            )
            yield Done(
                first,
                int(stats.get("bytes", 0)),
                prefill_s,
                float(stats.get("seconds", 0.0)),
                int(stats.get("chunks", 0)),
            )
        finally:
            if step is not None:
                await asyncio.gather(step, return_exceptions=True)
            if sender is not None:
                await asyncio.shield(sender.abort())
            if seq is not None:
                ex.free(seq)
            self.running -= 1
            if locked:
                self._compute.release()

    # --- prefix reuse ---------------------------------------------------------------------------
    def _add(self, job: PrefillJob) -> Sequence:
        """Reserves the request; a full pool first gives back least recently used cache entries."""
        try:
            return self.executor.add(job.request_id, job.prompt, job.params)
        except OutOfCapacity:
            if self.prefix_cache is None:
                raise
            need = self.executor.layout.blocks_for(len(job.prompt))
            self.on_cache_events(self.prefix_cache.evict(need, 1))
            return self.executor.add(job.request_id, job.prompt, job.params)

    def _reuse_prefix(self, seq: Sequence) -> tuple[int, int, list[int]]:
        """(tokens reused from the cache, the checkpoint boundary to stop at or 0, block hashes)."""
        cache, bs = self.prefix_cache, self.executor.layout.block_size
        if cache is None:
            return 0, 0, []
        hashes = block_hashes(seq.prompt, bs)
        boundary = (len(seq.prompt) - 1) // self.grid_tokens * self.grid_tokens  # last one before the end
        ids, slot = cache.lookup(hashes, boundary // bs)
        hit = 0
        if ids and slot is not None:
            self.executor.attach_prefix(seq, ids, slot)
            hit = len(ids) * bs
            self.cached_tokens += hit
        return hit, boundary if boundary > hit else 0, hashes

    def _checkpoint(self, seq: Sequence, hashes: list[int]) -> None:
        assert self.prefix_cache is not None
        try:
            slot = self.executor.checkpoint_state(seq)
        except OutOfCapacity:
            self.on_cache_events(self.prefix_cache.evict(0, 1))
            try:
                slot = self.executor.checkpoint_state(seq)
            except OutOfCapacity:
                return  # no slot to spare: this prefix is not cached
        self.on_cache_events(self.prefix_cache.insert(hashes, seq.block_table[: len(hashes)], slot))

    def stats(self) -> dict[str, int]:
        ex = self.executor
        return {
            "free_blocks": ex.blocks.num_free,
            "free_slots": ex.slots.num_free,
            "queue_depth": self.queue_depth,
            "running": self.running,
        }


def _next_or_none(steps: Iterator[LayerKv | int | None]) -> LayerKv | int | None:
    return next(steps, None)
