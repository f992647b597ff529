import asyncio
from collections.abc import Sequence

from prfaas.cluster import (
    CacheEvent,
    MatchResult,
    NodeInfo,
    NodeLoad,
    NodeStatus,
    PoolUnavailableError,
    RegisterResult,
    Role,
)
from prfaas.cluster.membership import MembershipAgent
from services.cachepool.core import CachePool


class FlakyPool:
    """The in-process core behind a switch that makes every call fail as if the pool were down."""

    def __init__(self, core: CachePool) -> None:
        self.core = core
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise PoolUnavailableError("down")

    async def register(self, node: NodeInfo) -> RegisterResult:
        self._check()
        return await self.core.register(node)

    async def heartbeat(
        self, node_id: str, load: NodeLoad, role: Role = Role.UNSPECIFIED, draining: bool = False
    ) -> bool:
        self._check()
        return await self.core.heartbeat(node_id, load, role, draining)

    async def list_nodes(self, cluster: str = "", role: Role = Role.UNSPECIFIED) -> list[NodeStatus]:
        self._check()
        return await self.core.list_nodes(cluster, role)

    async def publish(self, events: Sequence[CacheEvent]) -> int:
        self._check()
        return await self.core.publish(events)

    async def match(self, token_ids: Sequence[int]) -> MatchResult:
        self._check()
        return await self.core.match(token_ids)


NODE = NodeInfo("p0", "prfaas", Role.PREFILL, "127.0.0.1:7000")


async def until(cond, timeout_s: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout_s):
        while not await cond():
            await asyncio.sleep(0.01)


async def test_agent_registers_heartbeats_and_reports_role() -> None:
    pool = FlakyPool(CachePool(heartbeat_timeout_s=1.0))
    depth = iter(range(1000))
    agent = MembershipAgent(pool, NODE, lambda: NodeLoad(queue_depth=next(depth)), interval_s=0.02)
    await agent.start()
    await agent.wait_registered(1.0)

    async def loaded() -> bool:
        return (await pool.core.list_nodes())[0].load.queue_depth >= 2

    await until(loaded)
    agent.set_role(Role.DECODE)

    async def converted() -> bool:
        return (await pool.core.list_nodes())[0].node.role is Role.DECODE

    await until(converted)
    await agent.stop()


async def test_agent_survives_outage_and_reregisters_after_being_dropped() -> None:
    core = CachePool(heartbeat_timeout_s=0.1)
    pool = FlakyPool(core)
    pool.down = True
    republished = asyncio.Event()

    async def on_register() -> None:
        republished.set()

    agent = MembershipAgent(pool, NODE, NodeLoad, interval_s=0.02, on_register=on_register)
    await agent.start()
    await asyncio.sleep(0.1)
    assert not agent.registered
    pool.down = False
    await agent.wait_registered(1.0)
    await asyncio.wait_for(republished.wait(), 1.0)
    assert agent.registrations == 1

    pool.down = True                      # the pool cannot hear us; it drops us
    await asyncio.sleep(0.15)
    assert core.reap() == ["p0"]
    pool.down = False

    async def back() -> bool:
        return [s.node.node_id for s in await core.list_nodes()] == ["p0"]

    await until(back)
    assert agent.registrations == 2
    await agent.stop()
