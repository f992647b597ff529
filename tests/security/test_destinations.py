"""Where a prefill node may push KV (services/worker/destinations.py), against the cache pool's
own core: registered decode (or convertible) members at their registered address or host only;
a node without a pool pushes nowhere; concurrent misses share one membership read, and a member
that registers after the last read is found by the next one rather than refused."""

from __future__ import annotations

import asyncio

import pytest

from prfaas.cluster import NodeInfo, Role
from prfaas.errors import NotPermitted
from prfaas.messages import PrefillJob, SamplingParams
from services.cachepool.core import CachePool
from services.worker.destinations import Destinations


def job(node: str, address: str) -> PrefillJob:
    return PrefillJob("r", "t", [1, 2, 3], SamplingParams(), address, decode_node=node)


class Counting(CachePool):
    reads = 0

    async def list_nodes(self, cluster: str = "", role: Role = Role.UNSPECIFIED):  # type: ignore[no-untyped-def]
        self.reads += 1
        await asyncio.sleep(0.05)
        return await super().list_nodes(cluster, role)


async def test_members_only() -> None:
    pool = Counting(16, 10.0, None)
    await pool.register(NodeInfo("d0", "local", Role.DECODE, "10.0.0.7:50051"))
    await pool.register(NodeInfo("p0", "prfaas", Role.PREFILL, "10.0.0.8:50051"))
    await pool.register(NodeInfo("c0", "local", Role.PREFILL, "10.0.0.9:50051", convertible=True))
    dest = Destinations(pool, refresh_s=0.2)
    await asyncio.gather(*(dest.check(job("d0", "tcp://10.0.0.7:41000")) for _ in range(8)))
    assert pool.reads == 1  # eight misses, one read
    await dest.check(job("d0", "10.0.0.7:50051"))
    await dest.check(job("c0", "10.0.0.9:50051"))  # convertible: may decode
    for bad, words in [(job("ghost", "10.0.0.7:50051"), "not a registered member"),
                       (job("d0", "10.0.0.7:50052"), "registered at"),
                       (job("d0", "tcp://10.0.0.99:41000"), "registered at"),
                       (job("p0", "10.0.0.8:50051"), "prefill node"),
                       (job("", "10.0.0.7:50051"), "names no decode node")]:
        with pytest.raises(NotPermitted, match=words):
            await dest.check(bad)
    await pool.register(NodeInfo("d1", "local", Role.DECODE, "10.0.0.10:50051"))  # just registered
    await dest.check(job("d1", "10.0.0.10:50051"))
    with pytest.raises(NotPermitted, match="without a cache pool"):
        await Destinations(None).check(job("d0", "10.0.0.7:50051"))
