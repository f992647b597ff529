"""Where a prefill node may push KV: only to decode nodes that are registered members of the
cluster. The router names the decode node (its id and address) in every Prefill request; this
checks both against the membership the cache pool holds (read again when the last copy says no,
at most every `refresh_s`; concurrent misses share one read), so that a Prefill call cannot aim
the node's KV, which is users' prompts, at an arbitrary address (a server-side request forgery). Under mutual TLS the KV
connection then also verifies that the server's certificate names that node id.

A gRPC destination must be the member's registered address; a raw-TCP one (`tcp://host:port`,
whose port the node chose at start and reported only in Admit) must be on the member's host.
"""

from __future__ import annotations

import asyncio
import time

from prfaas.cluster import CachePoolApi, NodeStatus, Role
from prfaas.errors import NotPermitted
from prfaas.messages import PrefillJob
from prfaas.obs.log import get_logger

log = get_logger(__name__)


def _host(address: str) -> str:
    return address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")


class Destinations:
    def __init__(self, pool: CachePoolApi | None, refresh_s: float = 0.5) -> None:
        self.pool, self.refresh_s = pool, refresh_s
        self._members: dict[str, NodeStatus] = {}
        self._read_at = -float("inf")
        self._reading: asyncio.Future[None] | None = None

    async def _refresh(self) -> None:
        """Reads the membership again: at most once per `refresh_s` (a miss waits for the next
        read rather than being refused), one read at a time (concurrent misses share it)."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        try:
            await asyncio.shield(self._reading)
        finally:
            if self._reading is not None and self._reading.done():
                self._reading = None

    async def _read(self) -> None:
        assert self.pool is not None
        wait = self._read_at + self.refresh_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._read_at = time.monotonic()
        self._members = {m.node.node_id: m for m in await self.pool.list_nodes()}

    async def check(self, job: PrefillJob) -> None:
        """Raises NotPermitted (PERMISSION_DENIED) unless `job` pushes to a registered decode node
        (read the membership again once if the last copy says no: the node may have just moved)."""
        where = f"KV for {job.request_id} to {job.decode_address}"
        if self.pool is None:
            raise self._refuse(f"{where}: this prefill node runs without a cache pool, so it knows no members")
        if not job.decode_node:
            raise self._refuse(f"{where}: the request names no decode node")
        why = self._why_not(job)
        if why:  # the last copy says no: the node may have just registered or moved
            await self._refresh()
            why = self._why_not(job)
        if why:
            raise self._refuse(f"{where}: {why}")

    def _why_not(self, job: PrefillJob) -> str:
        return self._why_not_member(job.decode_node, job.decode_address, decode=True)

    def _why_not_member(self, node_id: str, address: str, decode: bool) -> str:
        m = self._members.get(node_id)
        if m is None:
            return f"{node_id!r} is not a registered member"
        if decode and m.node.role != Role.DECODE and not m.node.convertible:
            return f"member {node_id!r} is a {m.node.role.value} node"
        same = (_host(address) == _host(m.node.address) if address.startswith("tcp://")
                else address == m.node.address)
        return "" if same else f"member {node_id!r} is registered at {m.node.address}"

    async def check_member(self, node_id: str, address: str, what: str) -> None:
        """Raises NotPermitted unless `address` belongs to the registered member `node_id` (any
        role): where a prefix move may push."""
        where = f"{what} to {address}"
        if self.pool is None:
            raise self._refuse(f"{where}: this node runs without a cache pool, so it knows no members")
        if not node_id:
            raise self._refuse(f"{where}: the request names no destination node")
        why = self._why_not_member(node_id, address, decode=False)
        if why:
            await self._refresh()
            why = self._why_not_member(node_id, address, decode=False)
        if why:
            raise self._refuse(f"{where}: {why}")

    @staticmethod
    def _refuse(message: str) -> NotPermitted:
        log.warning("push_refused", reason=message)
        return NotPermitted(f"refusing to push {message}")
