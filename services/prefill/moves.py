"""Cross-cluster prefix moves, on prefill nodes: export a cached prefix to another node, or import
one into this node's prefix cache.

    importer: reserve(prefix) -> PrefixReserved(transfer_id, kv_address) ... KV arrives -> cache it
    holder:   look the prefix up -> read its blocks and checkpoint -> push them (KvPush) -> done

A move carries the full-attention KV of `[0, h)` and the linear state at `h` (the checkpoint), in
the same chunk plan and wire format as a prefill's transfer (its "prompt" is the prefix, its first
token a placeholder). The holder copies everything out of its pool before the first await, so an
eviction during the push cannot touch what travels. No gRPC here.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING

from prfaas.engine.executor import Executor, SeqState
from prfaas.engine.sink import ExecutorSink
from prfaas.errors import Code, InvalidRequest, OutOfCapacity, PrfaasError
from prfaas.kv.prefix import block_hashes
from prfaas.kv.prefix_cache import PrefixCache
from prfaas.kv.prefix_index import CacheEvent
from prfaas.messages import PrefixMoved, PrefixReserved, SamplingParams
from prfaas.obs.log import get_logger

from .core import KvPush

if TYPE_CHECKING:
    from prfaas.transport.receiver import KvReceiver

log = get_logger(__name__)

PLACEHOLDER_TOKEN = 0  # the FIRST_TOKEN chunk every transfer ends with; a move has no first token


class PrefixGone(PrfaasError):
    """The holder no longer has the whole prefix (evicted since the cache pool said so)."""

    code = Code.FAILED_PRECONDITION


# (address, transfer_id, prefix tokens, num_connections, deadline_unix_s, the importer's node id) -> a push
MoveSenderFactory = Callable[[str, str, int, int, float, str], KvPush]


class PrefixMover:
    def __init__(self, node_id: str, executor: Executor, cache: PrefixCache, receiver: KvReceiver,
                 sender_factory: MoveSenderFactory, publish: Callable[[list[CacheEvent]], None]) -> None:
        self.node_id, self.executor, self.cache, self.receiver = node_id, executor, cache, receiver
        self.sender_factory, self.publish = sender_factory, publish
        self.kv_address = ""  # set when the node serves the raw-TCP KV data port
        self.verify_sender = False  # mutual TLS: an imported prefix's KV only from the holder the router named
        self.bs = executor.layout.block_size
        self._ids = itertools.count()
        self.imported_bytes = self.exported_bytes = 0

    def _check(self, tokens: list[int], hit: int) -> list[int]:
        if not tokens or hit <= 0 or hit % self.bs or hit > len(tokens):
            raise InvalidRequest(f"hit_tokens {hit} must be a positive block boundary within the "
                                 f"{len(tokens)} tokens")
        return block_hashes(tokens[:hit], self.bs)

    # --- the holder ---------------------------------------------------------------------------------
    async def export(self, request_id: str, tokens: list[int], hit: int, transfer_id: str, address: str,
                     num_connections: int = 0, deadline_unix_s: float = 0.0, dest_node: str = "") -> PrefixMoved:
        """Pushes the cached prefix to the importer at `address`, whose certificate must name
        `dest_node` (mutual TLS; the servicer has checked that it is a registered member)."""
        hashes = self._check(tokens, hit)
        ids, slot = self.cache.lookup(hashes, len(hashes))
        if len(ids) != len(hashes) or slot is None:
            raise PrefixGone(f"node {self.node_id} holds {len(ids) * self.bs} of the {hit} tokens asked for")
        view = SeqState(request_id, tokens[:hit], SamplingParams(), list(ids), slot, num_cached=hit)
        layers = [self.executor.read_layer(view, i, 0, hit) for i in range(self.executor.layout.num_layers)]
        push = self.sender_factory(address, transfer_id, hit, num_connections, deadline_unix_s, dest_node)
        try:
            for lk in layers:
                await push.push_layer(lk)
            stats = await push.finish(PLACEHOLDER_TOKEN)
        except BaseException:
            await push.abort()
            raise
        self.exported_bytes += stats.bytes
        log.info("prefix_exported", tokens=hit, kv_bytes=stats.bytes, transfer_s=round(stats.seconds, 4))
        return PrefixMoved(hit, stats.bytes, stats.seconds)

    # --- the importer -------------------------------------------------------------------------------
    def _reserve(self, request_id: str, prefix: list[int]) -> SeqState:
        params = SamplingParams(max_tokens=1)
        try:
            return self.executor.add(request_id, prefix, params)
        except OutOfCapacity:
            self.publish(self.cache.evict(self.executor.layout.blocks_for(len(prefix)), 1))
            return self.executor.add(request_id, prefix, params)

    async def import_(self, request_id: str, tokens: list[int], hit: int, timeout_s: float = 30.0,
                      holder: str = "") -> AsyncGenerator[PrefixReserved | PrefixMoved, None]:
        """`PrefixReserved`, then `PrefixMoved` once the prefix is in this node's cache. Closed early
        (the router gave up), it frees what it reserved. Under mutual TLS the KV is taken only from
        `holder` (the node the router will ask to export), as a decode node takes a prefill's KV
        only from the prefill node named in Admit."""
        hashes = self._check(tokens, hit)
        secure = self.verify_sender
        if secure and not holder:
            raise InvalidRequest("ImportPrefix names no holder_node: under mutual TLS the KV is taken only from it")
        if not self.kv_address:
            raise PrfaasError(f"node {self.node_id} has no KV data port to import into")
        seq = self._reserve(request_id, tokens[:hit])
        transfer_id = f"{self.node_id}/move/{request_id}/{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        cached = False
        try:
            transfer = self.receiver.expect(transfer_id, self.executor.layout, prompt_tokens=hit, skip_tokens=0,
                                            sink=ExecutorSink(self.executor, seq), deadline_s=max(timeout_s, 0.1),
                                            sender=holder if secure else None)
            try:
                yield PrefixReserved(transfer_id, self.kv_address)
                t0 = time.monotonic()
                await transfer.wait()
            finally:
                self.receiver.cancel(transfer_id)
            self.publish(self.cache.insert(hashes, seq.block_table, seq.slot))  # the cache owns the slot now
            cached = True
            self.imported_bytes += transfer.bytes
            log.info("prefix_imported", tokens=hit, kv_bytes=transfer.bytes, seconds=round(time.monotonic() - t0, 4))
            yield PrefixMoved(hit, transfer.bytes, time.monotonic() - t0)
        finally:
            if cached:  # the request's references go; the cache keeps its own
                self.executor.blocks.free(seq.block_table)
                seq.block_table, seq.slot = [], -1
            else:
                self.executor.free(seq)
