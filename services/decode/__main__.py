"""python -m services.decode: a decode node (PD-D)."""

from __future__ import annotations

import asyncio

from prfaas.cluster import NodeInfo, NodeLoad, Role
from prfaas.cluster.client import CachePoolClient
from prfaas.cluster.membership import MembershipAgent
from prfaas.obs.log import configure
from prfaas.settings import NodeSettings, parse_node_settings
from prfaas.transport.receiver import KvReceiver
from prfaas.transport.servicer import SERVER_OPTIONS, add_decode_servicer
from prfaas.v1 import decode_pb2
from services.common.bootstrap import build_node_executor, serve
from services.decode.core import DecodeNode
from services.decode.server import DecodeServicer


async def main(s: NodeSettings) -> None:
    configure("decode", s.log_level)
    node = DecodeNode(s.node_id, build_node_executor(s), KvReceiver(), s.max_batch, s.transfer_timeout_s)
    node.start()
    agent: MembershipAgent | None = None

    def load() -> NodeLoad:
        st = node.stats()
        return NodeLoad(free_blocks=st["free_blocks"], free_slots=st["free_slots"],
                        queue_depth=st["pending_transfers"], running=st["running"])

    def add(server):  # type: ignore[no-untyped-def]
        servicer = DecodeServicer(node)
        add_decode_servicer(server, servicer, servicer.push)  # PushKv without a protobuf copy
        return [decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name]

    async def started(address: str) -> None:
        nonlocal agent
        if s.cachepool:
            info = NodeInfo(node_id=s.node_id, cluster=s.cluster, role=Role.DECODE, address=s.advertise or address,
                            capacity_blocks=s.kv_blocks, capacity_slots=s.state_slots, hardware=s.hardware)
            agent = MembershipAgent(CachePoolClient(s.cachepool), info, load)
            await agent.start()

    async def stopping() -> None:
        if agent:
            await agent.stop()
        await node.stop()

    await serve(s.listen, add, started, stopping, s.metrics_port, SERVER_OPTIONS)


if __name__ == "__main__":
    asyncio.run(main(parse_node_settings("decode")))
