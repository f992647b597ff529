"""The router's view of the cluster, from the cache pool: members (refreshed at most every
`refresh_s`) and per-node prefix hits."""

from __future__ import annotations

import time
from collections.abc import Sequence

from prfaas.cluster import CachePoolApi

from .core import Node


class CachePoolDirectory:
    def __init__(self, client: CachePoolApi, refresh_s: float = 0.5) -> None:
        self.client, self.refresh_s = client, refresh_s
        self._nodes: list[Node] = []
        self._at = -1e9

    async def nodes(self) -> Sequence[Node]:
        if time.monotonic() - self._at > self.refresh_s:
            statuses = await self.client.list_nodes()
            self._nodes = [
                Node(
                    s.node.node_id,
                    s.node.cluster,
                    str(s.node.role),
                    s.node.address,
                    # before its first heartbeat a node reports no load: take its capacity
                    s.load.queue_depth,
                    s.load.running,
                    s.load.free_blocks or s.node.capacity_blocks,
                    s.load.egress_bytes_per_s,
                    s.node.capacity_slots,
                    s.load.kv_retransmits,
                )
                for s in statuses
            ]
            self._at = time.monotonic()
        return self._nodes

    async def hits(self, token_ids: list[int]) -> dict[str, int]:
        result = await self.client.match(token_ids)
        return {h.node_id: h.hit_tokens for h in result.hits}
