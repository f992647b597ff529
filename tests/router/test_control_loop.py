"""The router's control loop on a scripted cluster view: egress near the link's capacity raises
the threshold; a prefill-bound local cluster converts a decode node to prefill."""

from __future__ import annotations

from dataclasses import replace

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


def _prfaas_cluster(egress: float = 0.0, queue: int = 0) -> Directory:
    return Directory([Node("pf0", "prfaas", "prefill", "a", queue_depth=queue, egress_bytes_per_s=egress),
                      Node("lp0", "local", "prefill", "b"), Node("ld0", "local", "decode", "c")])


def test_link_meter_measures_the_link_from_its_transfers():
    from prfaas.scheduling.link_meter import LinkMeter

    meter = LinkMeter(1e6, window_s=10.0)
    assert meter.read(0.0).capacity_bytes_per_s == 1e6, "no transfer yet: the configured rate"
    # a cut link: each 200 KB transfer needs 2 s where its compute took 0.2 s (1.8 s of it after), one after another
    for i in range(4):
        meter.record(2.0 * (i + 1), 200_000, 0.2, 2.0, 1.8)
    r = meter.read(8.0)
    assert r.link_bound and r.bound == 4 and abs(r.capacity_bytes_per_s - 1e5) < 1
    assert meter.read(30.0).capacity_bytes_per_s == r.capacity_bytes_per_s, "no news is not a restored link"
    # restored: transfers end with their compute; the estimate goes back toward the configured rate
    for i in range(4):
        meter.record(31.0 + i, 200_000, 0.5, 0.5, 0.02)
    r = meter.read(35.0)
    assert not r.link_bound and 1e5 < r.capacity_bytes_per_s < 1e6
    for k in range(20):
        r = meter.read(35.0 + k * 0.1)
    assert r.capacity_bytes_per_s > 0.99e6
    # two transfers sharing the link at once: bytes over the time either was in flight
    both = LinkMeter(1e9)
    both.record(10.0, 1_000_000, 1.0, 4.0, 3.0)  # in flight [6, 10]
    both.record(12.0, 1_000_000, 1.0, 4.0, 3.0)  # in flight [8, 12]
    assert abs(both.read(12.0).busy_rate_bytes_per_s - 2e6 / 6.0) < 1
    # four transfers always sharing a cut link of 100 KB/s: each 400 KB takes 16 s, one ends every
    # 4 s; their spans reach 16 s back, the window's completions carry 10 s of the link's bytes
    shared = LinkMeter(1e6, window_s=10.0)
    for k in range(1, 13):
        shared.record(4.0 * k, 400_000, 1.0, 16.0, 15.0)
        r = shared.read(4.0 * k + 2.0)
    assert r.link_bound and 0.8e5 <= r.capacity_bytes_per_s <= 1.25e5, r
    # a deep cut: one 800 KB transfer ends every 8 s (100 KB/s), each 7.5 s after its compute; a
    # 10 s window holds one or two of them, the meter keeps the last six and stays link-bound
    deep = LinkMeter(1e6, window_s=10.0)
    readings = []
    for k in range(1, 16):
        deep.record(8.0 * k, 800_000, 0.5, 8.0, 7.5)
        readings += [deep.read(8.0 * k + dt) for dt in (0.0, 2.0, 4.0, 6.0)]
    assert all(x.link_bound for x in readings[8:]), [x.link_bound for x in readings]
    assert all(0.8e5 <= x.capacity_bytes_per_s <= 1.25e5 for x in readings[8:])


async def _warmed(loop: ControlLoop, cluster: str) -> None:
    """Sixty prompts of 100-690 tokens seen (the controller's window) and two quiet ticks."""
    for i in range(60):
        n = 100 + 10 * i
        loop.on_decision(RouteDecision("prfaas", "pf0", "ld0", 0, n, "test"), n, 0.1)
        loop.on_prefill(cluster, n, 0.001 * n)
    await loop.tick(1.0)
    await loop.tick(2.0)


async def test_a_cut_link_raises_the_threshold_and_a_restored_one_relaxes_it():
    """The link cut to a tenth: the PrfaaS node's own egress counter still looks idle against the
    configured rate (what the controller used to compare), but its transfers drain long after their
    compute. The measured capacity says the link is full and t goes up; once transfers end with their
    compute again, t comes back to the plan's."""
    policy = PrfaasPolicy(threshold=100)
    link = 1e6
    directory = _prfaas_cluster(egress=0.05 * link)
    loop = ControlLoop(directory, policy, kv_bytes, link, interval_s=1.0, long_interval_s=1e9)
    await _warmed(loop, "local")
    assert policy.threshold == 100, "an idle link at its configured rate: t holds"
    # the cut: 400 KB transfers one after another, each 4 s (0.1 MB/s) behind 0.4 s of compute
    for end in (-5.0, -1.0, 3.0):
        loop.link.record(end, 400_000, 0.4, 4.0, 3.6)
    await loop.tick(3.0)
    raised = policy.threshold
    assert raised > 100 and loop.short is not None
    assert abs(loop.link.estimate - 1e5) < 1e4, loop.link.estimate
    # restored: prompt transfers end with their compute
    for k in range(6):
        loop.link.record(3.5 + 0.1 * k, 400_000, 0.4, 0.4, 0.01)
    for k in range(12):
        await loop.tick(4.0 + k)
    assert policy.threshold < raised
    assert loop.link.estimate > 0.9 * link


async def test_the_admission_backlog_counts_as_the_prfaas_queue():
    """The router keeps the nodes' own queues near empty (it holds the backlog in its admission
    queue): long prompts waiting there are the PrfaaS queue the controller must see."""
    policy = PrfaasPolicy(threshold=100)
    link = 1e6
    waiting: list[int] = []
    loop = ControlLoop(_prfaas_cluster(egress=0.6 * link), policy, kv_bytes, link, interval_s=1.0,
                       long_interval_s=1e9, waiting=lambda: waiting)
    await _warmed(loop, "prfaas")
    assert policy.threshold == 100, "no backlog, link at 0.6: t holds"
    waiting += [700] * 20 + [50] * 30  # 20 wait for the PrfaaS cluster (above t), 30 for local prefill
    await loop.tick(3.0)
    assert policy.threshold > 100
    assert loop.short is not None and "prfaas queue 20" in loop.short.history[-1].reason


async def test_a_local_backlog_in_the_router_converts_a_decode_node():
    changes: list[tuple[str, str]] = []

    async def set_role(node: Node, role: str) -> None:
        changes.append((node.node_id, role))

    nodes = [Node("lp0", "local", "prefill", "a", running=1),
             Node("ld0", "local", "decode", "b", running=1, capacity_slots=64),
             Node("ld1", "local", "decode", "c", running=0, capacity_slots=64)]
    long = LongTermController(LongTermConfig(window_s=10.0, cooldown_s=10.0))
    loop = ControlLoop(Directory(nodes), PrfaasPolicy(threshold=100), kv_bytes, 1e9, set_role,
                       interval_s=1.0, long_interval_s=1.0, long=long, waiting=lambda: [50] * 10)
    for t in range(1, 14):
        await loop.tick(float(t))
    assert changes == [("ld1", "prefill")]


def test_link_meter_drops_figures_a_node_should_never_send():
    """kv_bytes, prefill_s, transfer_s and drain_s arrive from prefill nodes (PrefillDone): NaN,
    infinite, negative or zero figures leave the estimate as it was, finite and positive."""
    from prfaas.scheduling.link_meter import LinkMeter

    meter = LinkMeter(1e6, window_s=10.0)
    nan, inf = float("nan"), float("inf")
    for bad in [(nan, 0.2, 2.0, 1.8), (200_000, nan, 2.0, 1.8), (200_000, 0.2, inf, 1.8), (200_000, 0.2, 2.0, nan),
                (200_000, 0.2, 2.0, inf), (200_000, -1.0, 2.0, 1.8), (200_000, 0.2, 2.0, -5.0), (0, 0.2, 2.0, 1.8),
                (200_000, 0.2, 0.0, 1.8), (-1, 0.2, 2.0, 1.8)]:
        for k in range(3):
            meter.record(1.0 + k, *bad)
    r = meter.read(5.0)
    assert r.transfers == 0 and r.capacity_bytes_per_s == 1e6


async def test_a_deep_cut_lends_a_decode_node_to_prefill_and_takes_it_back():
    """The link cut so far that no threshold fits with one local prefill node (SplitGuard): after
    three ticks in a row a convertible decode node becomes a prefill node; once the link has room
    at the planned threshold again and the local queue is empty, that node goes back to decode."""
    changes: list[tuple[str, str]] = []
    directory = Directory([Node("pf0", "prfaas", "prefill", "a"), Node("lp0", "local", "prefill", "b"),
                           *(Node(f"ld{i}", "local", "decode", "c", running=3, capacity_slots=64, convertible=True)
                             for i in range(3))])

    async def set_role(node: Node, role: str) -> None:
        changes.append((node.node_id, role))
        directory.items = [replace(n, role=role) if n.node_id == node.node_id else n for n in directory.items]

    policy, link = PrfaasPolicy(threshold=100), 1e6
    loop = ControlLoop(directory, policy, kv_bytes, link, set_role, interval_s=1.0, long_interval_s=1e9)
    assert loop.short is not None and loop.split is not None
    for i in range(60):  # one prompt a second of 100-690 tokens; local prefill 4 ms a token, PrfaaS 0.5
        n = 100 + 10 * i
        loop.short.record(float(i), n)
        loop.on_prefill("local", n, 0.004 * n)
        loop.on_prefill("prfaas", n, 0.0005 * n)
    for k in range(3):
        await loop.tick(60.0 + k)
    assert changes == [], "the configured link carries the plan: nothing to lend"
    for end in (52.0, 56.0, 60.0):  # the cut: 400 KB transfers 4 s each behind 0.4 s of compute
        loop.link.record(end, 400_000, 0.4, 4.0, 3.6)
    for k in range(3):
        await loop.tick(63.0 + k)
    assert changes == [("ld0", "prefill")] and loop.split.lent == ["ld0"]
    for k in range(6):  # restored: transfers end with their compute
        loop.link.record(90.0 + 0.1 * k, 400_000, 0.4, 0.4, 0.01)
    for k in range(30):
        await loop.tick(90.0 + k)
    assert changes == [("ld0", "prefill"), ("ld0", "decode")] and loop.split.lent == []
