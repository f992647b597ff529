"""The worker node's gRPC edge: `NodeControl` (SetRole, Stats) and the registration of every
servicer the node hosts (Prefill and/or Decode with its zero-copy PushKv)."""

from __future__ import annotations

import grpc

from prfaas.rpc.convert import role_from_pb, role_to_pb
from prfaas.rpc.handlers import add_service
from prfaas.rpc.status import mapped
from prfaas.transport.limits import limits_from_settings
from prfaas.v1 import common_pb2, common_pb2_grpc, decode_pb2, prefill_pb2

from ..decode.server import DecodeServicer
from ..prefill.server import PrefillServicer
from .node import WorkerNode

Ctx = grpc.aio.ServicerContext


class NodeControlServicer(common_pb2_grpc.NodeControlServicer):
    def __init__(self, node: WorkerNode) -> None:
        self.node = node

    @mapped
    async def SetRole(self, request: common_pb2.SetRoleRequest, context: Ctx) -> common_pb2.SetRoleResponse:  # noqa: N802
        previous = self.node.set_role(role_from_pb(request.role))
        if self.node.agent is not None and previous != self.node.role:
            await self.node.agent.heartbeat_now()  # routers see the new role now, not at the next beat
        return common_pb2.SetRoleResponse(previous=role_to_pb(previous), role=role_to_pb(self.node.role))

    @mapped
    async def Stats(self, request: common_pb2.NodeStatsRequest, context: Ctx) -> common_pb2.NodeStats:  # noqa: N802
        return common_pb2.NodeStats(node_id=self.node.settings.node_id, role=role_to_pb(self.node.role),
                                    **self.node.stats())


CONTROL = common_pb2.DESCRIPTOR.services_by_name["NodeControl"]
PREFILL = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"]
DECODE = decode_pb2.DESCRIPTOR.services_by_name["Decode"]


def add_servicers(node: WorkerNode, server: grpc.aio.Server) -> list[str]:
    names = [add_service(server, NodeControlServicer(node), CONTROL)]
    if node.prefill:
        names.append(add_service(server, PrefillServicer(node.prefill, node.mover, node.destinations.check,
                                                          node.destinations.check_member),
                                 PREFILL))
    if node.decode:
        servicer = DecodeServicer(node.decode)  # PushKv without a protobuf copy of the payload
        servicer.push.limits = limits_from_settings(node.settings)  # the data plane's limits (issue 10)
        names.append(add_service(server, servicer, DECODE, overrides={"PushKv": servicer.push.method_handler()}))
    return names
