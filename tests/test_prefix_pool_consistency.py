"""The cache pool's Match agrees with what the nodes really hold: prefill and decode nodes with
small pools, so that caching evicts all the time, and a node lost (its heartbeats stop: the pool
drops it) and back with an empty cache. After every step, for every probe prompt, the pool's hit
per node is recomputed from the node's own PrefixCache (blocks present in order, a checkpoint at
the end), and the two must be equal; every block the cache names is really held by the node's
allocator, every checkpoint's slot is allocated, and no checkpoint is reported without all its
blocks. Cores in one process, the real cache pool core (tests/prefix_support.py)."""

from __future__ import annotations

import pytest

from prfaas.cluster import NodeInfo, NodeLoad, Role
from prfaas.kv.prefix import block_hashes
from prfaas.kv.prefix_cache import PrefixCache
from prfaas.messages import SamplingParams
from prfaas.model.presets import write_preset
from prfaas.obs import metrics
from services.cachepool.core import CachePool
from tests.prefix_support import PrefixCluster
from tests.test_prefix_reuse import rand

BS = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_preset(tmp_path_factory.mktemp("qwen"), "qwen3_next", "tiny", seed=6))


def real_hits(cache: PrefixCache, prompt: list[int]) -> int:
    """The usable hit on the node itself, by the hybrid rule, without touching its LRU order."""
    best = 0
    for i, h in enumerate(block_hashes(prompt, BS)):
        if h not in cache.blocks:
            break
        if h in cache.states:
            best = (i + 1) * BS
    return best


def evicted() -> float:
    return sum(metrics.current().cache_events.labels(kind=k)._value.get() for k in ("block_evicted", "state_evicted"))


def check_node(m) -> None:  # type: ignore[no-untyped-def]
    """At rest only the cache holds anything: each of its blocks once, each of its slots."""
    ex, cache = m.executor, m.cache
    assert all(ex.blocks.refcount(b) == 1 for b in cache.blocks.values()), "a cached block not held once"
    assert ex.blocks.num_free + len(cache.blocks) == ex.blocks.num_blocks, "blocks held outside the cache"
    assert ex.slots.num_free + len(cache.states) == ex.slots.num_slots, "slots held outside the cache"
    assert all(h in cache.blocks for h in cache.states), "a checkpoint without its last block"


async def compare(c: PrefixCluster, probes: list[list[int]], alive: set[str]) -> int:
    await c.settle()
    hits_seen = 0
    for probe in probes:
        pool = {h.node_id: h.hit_tokens for h in (await c.pool.match(probe)).hits}
        real = {}
        for name, m in c.members.items():
            if name in alive and m.cache is not None and (n := real_hits(m.cache, probe)):
                real[name] = n
        assert pool == real, f"pool {pool} != nodes {real}"
        hits_seen += len(real)
    for name in alive:
        if c.members[name].cache is not None:
            check_node(c.members[name])
    return hits_seen


async def test_match_agrees_with_node_contents_under_eviction_and_node_loss(model_dir):
    clock = [0.0]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    nodes = {"p0": "local", "p1": "prfaas", "d0": "local"}
    async with PrefixCluster(model_dir, nodes, num_blocks=64, num_slots=8, max_states=4,
                             checkpoint_tokens=32, chunk_tokens=64) as c:
        c.pool = CachePool(block_size=16, heartbeat_timeout_s=5.0, clock=lambda: clock[0])  # a clock we move
        c.router.directory.pool = c.pool  # type: ignore[attr-defined]
        for name, m in c.members.items():
            role = Role.PREFILL if m.node.role == "prefill" else Role.DECODE
            await c.pool.register(NodeInfo(name, m.node.cluster, role, "127.0.0.1:1"))
        evicted0 = evicted()
        systems = [rand(40, 50 + i) for i in range(3)]
        probes, alive, seen = [], set(nodes), 0
        for i in range(14):
            prompt = systems[i % 3] + rand(150 + 37 * (i % 4), 60 + i)
            if i % 5 == 4 and probes:  # a follow-up turn of an earlier conversation
                prompt = probes[-1] + rand(30, 80 + i)
            route = "prfaas" if i % 2 else "local"
            tokens, _ = await c.generate(f"r{i}", prompt, params, route)
            probes.append(prompt + tokens)
            seen += await compare(c, probes[-6:] + systems, alive)
            if i == 8:  # p1 is lost: no more heartbeats; the pool drops it and all it held
                clock[0] += 6.0
                for name in alive - {"p1"}:
                    await c.pool.heartbeat(name, NodeLoad())
                assert c.pool.reap() == ["p1"]
                alive.discard("p1")
                seen += await compare(c, probes + systems, alive)
                # it comes back with an empty cache (a restart): registering starts it empty
                p1 = c.members["p1"]
                assert p1.cache is not None
                p1.cache.evict(p1.executor.blocks.num_blocks, p1.executor.slots.num_slots)
                await c.pool.register(NodeInfo("p1", "prfaas", Role.PREFILL, "127.0.0.1:1"))
                alive.add("p1")
                seen += await compare(c, probes + systems, alive)
        assert seen > 10, "the probes did hit (the comparison is not vacuous)"
        assert evicted() - evicted0 > 20, "the small pools did evict"
