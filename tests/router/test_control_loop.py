"""The router's control loop on a scripted cluster view: egress near the link's capacity raises
the threshold; a prefill-bound local cluster converts a decode node to prefill."""

from __future__ import annotations

from prfaas.scheduling.controller import LongTermConfig, LongTermController
from prfaas.scheduling.policy import PrfaasPolicy, RouteDecision
from services.router.control import ControlLoop
from services.router.core import Node


class Directory:
    def __init__(self, nodes: list[Node]) -> None:
        self.items = nodes

    async def nodes(self):
        return self.items

    async def hits(self, token_ids):
        return {}


def kv_bytes(tokens: int) -> int:
    return 1000 * tokens


async def test_egress_near_capacity_raises_threshold():
    policy = PrfaasPolicy(threshold=100)
    link = 1e6  # bytes/s
    nodes = [Node("pf0", "prfaas", "prefill", "a", queue_depth=20, egress_bytes_per_s=0.95 * link),
             Node("lp0", "local", "prefill", "b"), Node("ld0", "local", "decode", "c")]
    loop = ControlLoop(Directory(nodes), policy, kv_bytes, link, interval_s=1.0, long_interval_s=1e9)
    for i in range(60):
        loop.on_decision(RouteDecision("prfaas", "pf0", "ld0", 0, 100 + 10 * i, "test"), 100 + 10 * i, 0.1)
        loop.on_prefill("prfaas", 100 + 10 * i, 0.001 * (100 + 10 * i))
    await loop.tick(1.0)
    await loop.tick(2.0)
    assert policy.threshold > 100
    assert loop.short is not None and loop.short.history, "the change is recorded"


async def test_prefill_bound_cluster_converts_a_decode_node():
    changes: list[tuple[str, str]] = []

    async def set_role(node: Node, role: str) -> None:
        changes.append((node.node_id, role))

    nodes = [Node("lp0", "local", "prefill", "a", queue_depth=10, running=1),
             Node("ld0", "local", "decode", "b", running=1, capacity_slots=64),
             Node("ld1", "local", "decode", "c", running=0, capacity_slots=64)]
    long = LongTermController(LongTermConfig(window_s=10.0, cooldown_s=10.0))
    loop = ControlLoop(Directory(nodes), PrfaasPolicy(threshold=100), kv_bytes, 1e9, set_role,
                       interval_s=1.0, long_interval_s=1.0, long=long)
    for t in range(1, 14):
        await loop.tick(float(t))
    assert changes == [("ld1", "prefill")]


async def test_retransmits_on_the_kv_connections_raise_the_threshold():
    policy = PrfaasPolicy(threshold=100)
    link = 1e9  # plenty: only congestion can move t
    pf = Node("pf0", "prfaas", "prefill", "a", kv_retransmits=0)
    directory = Directory([pf, Node("lp0", "local", "prefill", "b"), Node("ld0", "local", "decode", "c")])
    loop = ControlLoop(
        directory, policy, kv_bytes, link, interval_s=1.0, long_interval_s=1e9, congestion_retransmits=10
    )
    await loop.tick(1.0)
    assert policy.threshold == 100, "no retransmits, idle link: t holds"
    directory.items[0] = Node("pf0", "prfaas", "prefill", "a", kv_retransmits=500)
    await loop.tick(2.0)
    assert policy.threshold > 100 and loop.short is not None and loop.short.history[-1].reason == "congestion"


async def test_tcp_retransmits_read_from_a_live_socket():
    import asyncio

    from prfaas.transport.tcp import tcp_retransmits

    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    assert tcp_retransmits(writer.get_extra_info("socket")) == 0  # loopback does not lose segments
    assert tcp_retransmits(None) == 0
    writer.close()
    server.close()
