"""Where a prefill node may push KV: only to decode nodes that are registered members of the
cluster. The router names the decode node (its id and address) in every Prefill request; this
checks both against the membership the cache pool holds (read again when the node is not in the
last copy, at most every `refresh_s`), so that a Prefill call cannot aim the node's KV, which is
users' prompts, at an arbitrary address (a server-side request forgery). Under mutual TLS the KV
connection then also verifies that the server's certificate names that node id.

A gRPC destination must be the member's registered address; a raw-TCP one (`tcp://host:port`,
whose port the node chose at start and reported only in Admit) must be on the member's host.
"""

from __future__ import annotations

import time

from prfaas.cluster import CachePoolApi, NodeStatus, Role
from prfaas.errors import NotPermitted
from prfaas.messages import PrefillJob
from prfaas.obs.log import get_logger

log = get_logger(__name__)


def _host(address: str) -> str:
    return address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")


class Destinations:
    def __init__(self, pool: CachePoolApi | None, refresh_s: float = 1.0) -> None:
        self.pool, self.refresh_s = pool, refresh_s
        self._members: dict[str, NodeStatus] = {}
        self._read_at = -float("inf")

    async def _refresh(self) -> bool:
        if self.pool is None or time.monotonic() - self._read_at < self.refresh_s:
            return False
        self._read_at = time.monotonic()
        self._members = {m.node.node_id: m for m in await self.pool.list_nodes()}
        return True

    async def check(self, job: PrefillJob) -> None:
        """Raises NotPermitted (PERMISSION_DENIED) unless `job` pushes to a registered decode node
        (read the membership again once if the last copy says no: the node may have just moved)."""
        where = f"KV for {job.request_id} to {job.decode_address}"
        if self.pool is None:
            raise self._refuse(f"{where}: this prefill node runs without a cache pool, so it knows no members")
        if not job.decode_node:
            raise self._refuse(f"{where}: the request names no decode node")
        why = self._why_not(job)
        if why and await self._refresh():
            why = self._why_not(job)
        if why:
            raise self._refuse(f"{where}: {why}")

    def _why_not(self, job: PrefillJob) -> str:
        m = self._members.get(job.decode_node)
        if m is None:
            return f"{job.decode_node!r} is not a registered member"
        if m.node.role != Role.DECODE and not m.node.convertible:
            return f"member {job.decode_node!r} is a {m.node.role.value} node"
        same = (_host(job.decode_address) == _host(m.node.address) if job.decode_address.startswith("tcp://")
                else job.decode_address == m.node.address)
        return "" if same else f"member {job.decode_node!r} is registered at {m.node.address}"

    @staticmethod
    def _refuse(message: str) -> NotPermitted:
        log.warning("push_refused", reason=message)
        return NotPermitted(f"refusing to push {message}")
