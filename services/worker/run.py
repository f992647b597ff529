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
    kv_tcp = KvTcpServer(node.receiver)  # the raw-TCP data port, when the node decodes
    if node.decode:
        node.decode.verify_sender = not tls.current().insecure  # KV only from the node Admit names
        node.decode.start()

    async def started(address: str) -> None:
        if node.decode and s.kv_transport == "tcp":
            host = s.listen.rsplit(":", 1)[0]
            port = await kv_tcp.start(host, s.kv_tcp_port)
            advertised = (s.advertise or address).rsplit(":", 1)[0]
            node.decode.kv_address = f"tcp://{advertised}:{port}"
            log.info("kv_data_port", address=node.decode.kv_address)
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
