"""A worker node process: prefill, decode, or convertible (both cores over one executor).

`python -m services.prefill` and `python -m services.decode` both run `run_node` with their role.
A convertible node (`--convertible`) can be switched between prefill and decode by the router's
long-term controller through `NodeControl.SetRole`; requests of the old role run to completion.
"""

from __future__ import annotations

import asyncio
import time

from prfaas.cluster import Role
from prfaas.cluster.client import CachePoolClient
from prfaas.cluster.membership import MembershipAgent
from prfaas.obs import metrics
from prfaas.obs.log import configure, get_logger
from prfaas.rpc.serve import serve
from prfaas.security import tls
from prfaas.settings import NodeSettings
from prfaas.transport import pool as kv_pool
from prfaas.transport.limits import limits_from_settings
from prfaas.transport.tcp import KvTcpServer

from .node import WorkerNode
from .server import add_servicers

log = get_logger(__name__)


async def run_node(s: NodeSettings, role: Role) -> None:
    configure(role.value, s.log_level)
    metrics.install(*(("prefill", "decode") if s.convertible else (role.value,)))
    pool = CachePoolClient(s.cachepool) if s.cachepool else None
    node = WorkerNode(s, role, pool)
    node.bind_metrics()
    limits = limits_from_settings(s)
    kv_tcp = KvTcpServer(node.receiver, limits)  # the raw-TCP data port, when the node decodes
    kv_pool.configure(limits.pool_per_address, limits.pool_idle_s)  # the prefill side's idle connections
    if node.mover is not None:
        node.mover.verify_sender = not tls.current().insecure  # a moved prefix only from the named holder
    if node.decode:
        node.decode.verify_sender = not tls.current().insecure  # KV only from the node Admit names
        node.decode.start()

    async def started(address: str) -> None:
        if (node.decode and s.kv_transport == "tcp") or node.mover:  # a prefill node imports moved prefixes
            host = s.listen.rsplit(":", 1)[0]
            port = await kv_tcp.start(host, s.kv_tcp_port)
            advertised = (s.advertise or address).rsplit(":", 1)[0]
            kv_address = f"tcp://{advertised}:{port}"
            if node.decode and s.kv_transport == "tcp":
                node.decode.kv_address = kv_address
            if node.mover:
                node.mover.kv_address = kv_address
            log.info("kv_data_port", address=kv_address)
        if pool is not None:
            node.agent = MembershipAgent(pool, node.info(address), node.load, on_register=node.republish)
            await node.agent.start()

    async def ready() -> None:  # serving once the cluster knows the node (at once when standalone)
        if node.agent is not None:
            await node.agent.wait_registered()

    async def drain() -> None:  # routers stop sending new work; what is in flight finishes
        node.drain()
        if node.agent is not None:
            await node.agent.heartbeat_now()
        deadline = time.monotonic() + s.drain_timeout_s
        while node.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        log.info("drained", left_busy=node.busy)

    async def stopping() -> None:
        if node.agent:
            await node.agent.stop()
        if node.decode:
            await node.decode.stop()
        await kv_tcp.stop()
        await node.channels.close()
        if pool is not None:
            await pool.close()

    await serve(s.listen, lambda server: add_servicers(node, server), started, stopping, s.metrics_port,
                ready=ready, drain=drain)
