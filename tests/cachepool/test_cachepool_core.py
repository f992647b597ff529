import asyncio

import pytest

from prfaas.cluster import (
    CacheEvent,
    CacheEventKind,
    InvalidArgumentError,
    NodeInfo,
    NodeLoad,
    Role,
    UnknownNodeError,
)
from prfaas.kv.prefix import block_hashes
from services.cachepool.core import CachePool

BS = 4
PROMPT = list(range(16))
H = block_hashes(PROMPT, BS)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def node(node_id: str, cluster: str = "local", role: Role = Role.PREFILL) -> NodeInfo:
    return NodeInfo(node_id, cluster, role, f"127.0.0.1:{5000 + len(node_id)}", capacity_blocks=64)


def held(node_id: str, blocks: int, state_at: int) -> list[CacheEvent]:
    return [
        CacheEvent(node_id, CacheEventKind.BLOCK_STORED, tuple(H[:blocks])),
        CacheEvent(node_id, CacheEventKind.STATE_STORED, (H[state_at - 1],)),
    ]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pool(clock: Clock) -> CachePool:
    return CachePool(block_size=BS, heartbeat_timeout_s=3.0, clock=clock)


async def test_register_list_and_filter(pool: CachePool) -> None:
    r = await pool.register(node("p1", "prfaas"))
    assert r.heartbeat_timeout_s == 3.0 and r.heartbeat_interval_s == pytest.approx(1.0)
    await pool.register(node("d1", "local", Role.DECODE))
    await pool.register(node("p2", "local"))
    assert [s.node.node_id for s in await pool.list_nodes()] == ["d1", "p1", "p2"]
    assert [s.node.node_id for s in await pool.list_nodes(cluster="local")] == ["d1", "p2"]
    assert [s.node.node_id for s in await pool.list_nodes(role=Role.PREFILL)] == ["p1", "p2"]
    assert [s.node.node_id for s in await pool.list_nodes("local", Role.DECODE)] == ["d1"]


async def test_heartbeat_updates_load_age_and_role(pool: CachePool, clock: Clock) -> None:
    await pool.register(node("n1"))
    clock.now += 2
    assert await pool.heartbeat("n1", NodeLoad(free_blocks=10, queue_depth=3), Role.DECODE)
    clock.now += 0.5
    (s,) = await pool.list_nodes()
    assert s.load.free_blocks == 10 and s.load.queue_depth == 3
    assert s.node.role is Role.DECODE and s.last_heartbeat_age_s == pytest.approx(0.5)
    assert await pool.heartbeat("n1", NodeLoad())                    # UNSPECIFIED keeps the role
    assert (await pool.list_nodes())[0].node.role is Role.DECODE
    assert not await pool.heartbeat("ghost", NodeLoad())


async def test_silent_node_is_dropped_from_membership_and_index(pool: CachePool, clock: Clock) -> None:
    await pool.register(node("quiet"))
    await pool.register(node("chatty"))
    await pool.publish(held("quiet", 4, 4) + held("chatty", 2, 2))
    assert (await pool.match(PROMPT)).hit_tokens("quiet") == 16
    clock.now += 2.5
    await pool.heartbeat("chatty", NodeLoad())
    clock.now += 1.0
    assert pool.reap() == ["quiet"]
    assert [s.node.node_id for s in await pool.list_nodes()] == ["chatty"]
    m = await pool.match(PROMPT)
    assert [(h.node_id, h.hit_tokens) for h in m.hits] == [("chatty", 8)]
    assert not await pool.heartbeat("quiet", NodeLoad())
    await pool.register(node("quiet"))                                 # back, with an empty cache
    assert (await pool.match(PROMPT)).hit_tokens("quiet") == 0


async def test_match_orders_hits_and_names_clusters(pool: CachePool) -> None:
    await pool.register(node("a", "local"))
    await pool.register(node("b", "prfaas"))
    assert await pool.publish(held("a", 4, 2) + held("b", 4, 3)) == 4
    m = await pool.match(PROMPT)
    assert m.block_size == BS
    assert [(h.node_id, h.cluster, h.hit_tokens) for h in m.hits] == [("b", "prfaas", 12), ("a", "local", 8)]
    assert (await pool.match([])).hits == []


async def test_bad_input(pool: CachePool) -> None:
    with pytest.raises(InvalidArgumentError, match="node_id"):
        await pool.register(NodeInfo("", "local", Role.PREFILL, "127.0.0.1:1"))
    for address in ("", "nohost", "127.0.0.1:", "h:99999", ":80"):
        with pytest.raises(InvalidArgumentError, match="address"):
            await pool.register(NodeInfo("n", "local", Role.PREFILL, address))
    with pytest.raises(InvalidArgumentError):
        await pool.heartbeat("", NodeLoad())
    with pytest.raises(UnknownNodeError, match="ghost"):
        await pool.publish(held("ghost", 1, 1))
    with pytest.raises(InvalidArgumentError):
        await pool.match([2**40] * BS)


async def test_reaper_task_runs_and_stops_cleanly() -> None:
    pool = CachePool(block_size=BS, heartbeat_timeout_s=0.08)
    await pool.start()
    await pool.register(node("n"))
    await asyncio.sleep(0.25)
    assert await pool.list_nodes() == []
    await pool.stop()
    await pool.stop()


def test_settings_come_from_flags_with_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from prfaas.settings import parse_cachepool_settings as parse_settings

    monkeypatch.setenv("PRFAAS_LISTEN", "0.0.0.0:7001")
    monkeypatch.setenv("PRFAAS_HEARTBEAT_TIMEOUT_S", "2.5")
    monkeypatch.setenv("PRFAAS_METRICS_PORT", "9100")
    s = parse_settings(["--log-level", "DEBUG", "--metrics-port", "9200"])
    assert (s.listen, s.heartbeat_timeout_s) == ("0.0.0.0:7001", 2.5)
    assert (s.metrics_port, s.log_level) == (9200, "DEBUG")
    assert s.heartbeat_interval_s is None and s.block_size == 16
