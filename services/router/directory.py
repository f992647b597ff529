"""The router's view of the cluster, from the cache pool: members (refreshed at most every
`refresh_s`) and per-node prefix hits.

The cache pool is not a single point of failure: while it cannot be reached, `nodes()` keeps the
last membership it had (`degraded` is then True) and `hits()` answers no hits, so routing goes on
without cache awareness until the pool is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from prfaas.cluster import CachePoolApi, CachePoolError
from prfaas.obs.log import get_logger

from .placement import Node

log = get_logger(__name__)


class CachePoolDirectory:
    def __init__(
        self, client: CachePoolApi, refresh_s: float = 0.5, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.client, self.refresh_s, self.clock = client, refresh_s, clock
        self._nodes: list[Node] = []
        self._at = -1e9
        self.degraded = False

    async def nodes(self) -> Sequence[Node]:
        if self.clock() - self._at <= self.refresh_s:
            return self._nodes
        self._at = self.clock()  # at most one attempt per period, also when the pool is down
        try:
            statuses = await self.client.list_nodes()
        except CachePoolError as e:
            self._set_degraded(True, e)
            return self._nodes
        self._set_degraded(False)
        now = self.clock()
        self._nodes = [
            Node(
                s.node.node_id,
                s.node.cluster,
                str(s.node.role),
                s.node.address,
                s.load.queue_depth,
                s.load.running,
                # before its first heartbeat a node reports no load: take its capacity
                s.load.free_blocks or s.node.capacity_blocks,
                s.load.egress_bytes_per_s,
                s.node.capacity_slots,
                s.load.kv_retransmits,
                capacity_blocks=s.node.capacity_blocks,
                block_size=s.node.block_size or 16,
                max_request_blocks=s.node.max_request_blocks,
                max_context=s.node.max_context,
                convertible=s.node.convertible,
                prefix_grid=s.node.prefix_grid,
                draining=s.draining,
                heartbeat_at=now - s.last_heartbeat_age_s,
            )
            for s in statuses
        ]
        return self._nodes

    async def hits(self, token_ids: list[int]) -> dict[str, int]:
        try:
            result = await self.client.match(token_ids)
        except CachePoolError as e:
            self._set_degraded(True, e)
            return {}
        return {h.node_id: h.hit_tokens for h in result.hits}

    def _set_degraded(self, degraded: bool, error: Exception | None = None) -> None:
        if degraded and not self.degraded:
            log.warning("cachepool_unreachable", error=str(error), action="routing on the last membership, no cache")
        elif not degraded and self.degraded:
            log.info("cachepool_back")
        self.degraded = degraded
