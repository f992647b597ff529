"""Keeps one node a member of the cluster: registers it, heartbeats its load, and registers again
whenever the pool answers that the node is unknown (it was dropped, or the pool restarted).

The agent survives the pool being unreachable: it logs and retries every interval. After each
(re-)registration it awaits `on_register`, where a node can republish its cache inventory, since the
pool starts a (re-)registered node with an empty prefix index entry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

from prfaas.cluster import CachePoolApi, CachePoolError, NodeInfo, NodeLoad, Role
from prfaas.obs.log import get_logger

log = get_logger(__name__)


class MembershipAgent:
    def __init__(
        self,
        client: CachePoolApi,
        node: NodeInfo,
        load_fn: Callable[[], NodeLoad],
        interval_s: float | None = None,
        on_register: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`interval_s=None` heartbeats at the interval the pool asks for when registering."""
        self._client = client
        self._node = node
        self._load_fn = load_fn
        self._interval_s = interval_s
        self._on_register = on_register
        self._registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.registrations = 0
        self.draining = False  # reported with every heartbeat: routers stop sending new work

    @property
    def node(self) -> NodeInfo:
        return self._node

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    def set_role(self, role: Role) -> None:
        """The node was converted (prefill <-> decode); the next heartbeat tells the pool."""
        self._node = replace(self._node, role=role)

    async def start(self) -> None:
        """Starts the background loop and returns at once, even while the pool is unreachable."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"membership-{self._node.node_id}")

    async def heartbeat_now(self) -> None:
        """One heartbeat at once (a role or draining change the routers should see now)."""
        if self._registered.is_set():
            try:
                await self._client.heartbeat(self._node.node_id, self._load_fn(), self._node.role, self.draining)
            except CachePoolError as e:
                log.warning("cachepool_call_failed", node_id=self._node.node_id, error=str(e))

    async def wait_registered(self, timeout_s: float | None = None) -> None:
        await asyncio.wait_for(self._registered.wait(), timeout_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        interval = self._interval_s or 1.0
        while True:
            try:
                if not self._registered.is_set():
                    result = await self._client.register(self._node)
                    interval = self._interval_s or result.heartbeat_interval_s
                    self.registrations += 1
                    self._registered.set()
                    log.info("registered", node_id=self._node.node_id, heartbeat_interval_s=interval)
                    if self._on_register is not None:
                        await self._on_register()
                elif not await self._client.heartbeat(self._node.node_id, self._load_fn(), self._node.role,
                                                      self.draining):
                    log.warning("unknown_to_pool", node_id=self._node.node_id)
                    self._registered.clear()
                    continue
            except CachePoolError as e:
                log.warning("cachepool_call_failed", node_id=self._node.node_id, error=str(e))
            except Exception:
                log.exception("membership_step_failed", node_id=self._node.node_id)
            await asyncio.sleep(interval)
