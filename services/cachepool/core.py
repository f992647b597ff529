"""The cache pool's core: cluster membership with heartbeats, and the hybrid prefix index.

A plain async class (no gRPC): `server.py` maps messages to these calls, and a test or an in-process
cluster can call it directly, since it implements `prfaas.cluster.CachePoolApi`. A node that has not
heartbeated for `heartbeat_timeout_s` is dropped from membership and from the index; registering
(again) starts a node with an empty index entry, since a restarted node's cache is gone.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from prfaas.cluster import (
    CacheEvent,
    InvalidArgumentError,
    MatchResult,
    NodeHit,
    NodeInfo,
    NodeLoad,
    NodeStatus,
    RegisterResult,
    Role,
    UnknownNodeError,
)
from prfaas.kv.prefix_index import PrefixIndex
from prfaas.obs import metrics
from prfaas.obs.log import get_logger

log = get_logger(__name__)


@dataclass
class _Member:
    info: NodeInfo
    load: NodeLoad
    last_seen: float
    draining: bool = False


def _validate(node: NodeInfo) -> None:
    if not node.node_id:
        raise InvalidArgumentError("node_id must not be empty")
    host, sep, port = node.address.rpartition(":")
    if not (host and sep and port.isdigit() and 0 < int(port) < 65536):
        raise InvalidArgumentError(f"address must be host:port, got {node.address!r}")
    if node.capacity_blocks < 0 or node.capacity_slots < 0:
        raise InvalidArgumentError("capacities must not be negative")


class CachePool:
    def __init__(
        self,
        block_size: int = 16,
        heartbeat_timeout_s: float = 10.0,
        heartbeat_interval_s: float | None = None,
        requires_state: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s must be positive, got {heartbeat_timeout_s}")
        self.block_size = block_size
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s or heartbeat_timeout_s / 3
        self._clock = clock
        self._index = PrefixIndex(block_size, requires_state)
        self._members: dict[str, _Member] = {}
        self._reaper: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="cachepool-reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except asyncio.CancelledError:
                pass
            self._reaper = None

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self.heartbeat_timeout_s / 4, 1.0))
            self.reap()

    def reap(self) -> list[str]:
        """Drops every node whose last heartbeat is older than the timeout; returns their ids."""
        now = self._clock()
        dead = [n for n, m in self._members.items() if now - m.last_seen > self.heartbeat_timeout_s]
        for node_id in dead:
            self._drop(node_id)
            log.warning("node_dropped", node_id=node_id, reason="missed heartbeats")
        return dead

    def _drop(self, node_id: str) -> None:
        self._members.pop(node_id, None)
        self._index.drop_node(node_id)
        self._update_gauges()

    def _update_gauges(self) -> None:
        nodes = metrics.current().cluster_nodes
        nodes.clear()
        for m in self._members.values():
            nodes.labels(cluster=m.info.cluster, role=m.info.role.value).inc()

    # --- membership ------------------------------------------------------------------------------
    async def register(self, node: NodeInfo) -> RegisterResult:
        _validate(node)
        self._index.drop_node(node.node_id)
        self._members[node.node_id] = _Member(node, NodeLoad(), self._clock())
        self._update_gauges()
        log.info("node_registered", node_id=node.node_id, cluster=node.cluster, role=node.role.value,
                 address=node.address)
        return RegisterResult(self.heartbeat_interval_s, self.heartbeat_timeout_s)

    async def heartbeat(
        self, node_id: str, load: NodeLoad, role: Role = Role.UNSPECIFIED, draining: bool = False
    ) -> bool:
        if not node_id:
            raise InvalidArgumentError("node_id must not be empty")
        member = self._members.get(node_id)
        if member is None:
            return False
        member.load = load
        member.last_seen = self._clock()
        if draining and not member.draining:
            log.info("node_draining", node_id=node_id)
        member.draining = draining
        if role is not Role.UNSPECIFIED and role is not member.info.role:
            log.info("node_role_changed", node_id=node_id, old=member.info.role.value, new=role.value)
            member.info = replace(member.info, role=role)
            self._update_gauges()
        return True

    async def list_nodes(self, cluster: str = "", role: Role = Role.UNSPECIFIED) -> list[NodeStatus]:
        now = self._clock()
        return [
            NodeStatus(m.info, m.load, now - m.last_seen, m.draining)
            for node_id, m in sorted(self._members.items())
            if cluster in ("", m.info.cluster) and role in (Role.UNSPECIFIED, m.info.role)
        ]

    # --- prefix index ----------------------------------------------------------------------------
    async def publish(self, events: Sequence[CacheEvent]) -> int:
        """Applies events in order; an event from an unknown node raises UnknownNodeError and stops
        there (earlier events stay applied)."""
        for event in events:
            if not event.node_id:
                raise InvalidArgumentError("cache event without node_id")
            if event.node_id not in self._members:
                raise UnknownNodeError(f"node {event.node_id!r} is not registered")
            self._index.apply(event)
            metrics.current().cache_events.labels(kind=event.kind.value).inc()
        return len(events)

    async def match(self, token_ids: Sequence[int]) -> MatchResult:
        try:
            by_node = self._index.match(token_ids)
        except struct.error as e:
            raise InvalidArgumentError(f"token ids must fit in int32: {e}") from e
        hits = [
            NodeHit(node_id, self._members[node_id].info.cluster, tokens)
            for node_id, tokens in by_node.items()
            if node_id in self._members
        ]
        hits.sort(key=lambda h: (-h.hit_tokens, h.node_id))
        return MatchResult(self.block_size, hits)
