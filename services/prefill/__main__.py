"""python -m services.prefill: a prefill node (local PD-P or PrfaaS)."""

from __future__ import annotations

import asyncio

from prfaas.cluster import NodeInfo, NodeLoad, Role
from prfaas.cluster.client import CachePoolClient
from prfaas.cluster.membership import MembershipAgent
from prfaas.obs.log import configure
from prfaas.settings import NodeSettings, parse_node_settings
from prfaas.transport.sender import KvChannels
from prfaas.v1 import prefill_pb2, prefill_pb2_grpc
from services.common.bootstrap import build_node_executor, serve
from services.prefill.core import PrefillNode
from services.prefill.server import PrefillServicer, sender_factory


async def main(s: NodeSettings) -> None:
    configure("prefill", s.log_level)
    executor = build_node_executor(s)
    channels = KvChannels(s.kv_connections)
    node = PrefillNode(s.node_id, executor, sender_factory(executor.layout, channels))
    agent: MembershipAgent | None = None

    def load() -> NodeLoad:
        st = node.stats()
        return NodeLoad(free_blocks=st["free_blocks"], free_slots=st["free_slots"],
                        queue_depth=st["queue_depth"], running=st["running"])

    def add(server):  # type: ignore[no-untyped-def]
        prefill_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(node), server)
        return [prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name]

    async def started(address: str) -> None:
        nonlocal agent
        if s.cachepool:
            info = NodeInfo(node_id=s.node_id, cluster=s.cluster, role=Role.PREFILL, address=s.advertise or address,
                            capacity_blocks=s.kv_blocks, capacity_slots=s.state_slots, hardware=s.hardware)
            agent = MembershipAgent(CachePoolClient(s.cachepool), info, load)
            await agent.start()

    async def stopping() -> None:
        if agent:
            await agent.stop()
        await channels.close()

    await serve(s.listen, add, started, stopping, s.metrics_port)


if __name__ == "__main__":
    asyncio.run(main(parse_node_settings("prefill")))
