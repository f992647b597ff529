"""The worker node's gRPC edge: `NodeControl` (SetRole, Stats) and the registration of every
servicer the node hosts (Prefill and/or Decode with its zero-copy PushKv)."""

from __future__ import annotations

import grpc

from prfaas.rpc.convert import role_from_pb, role_to_pb
from prfaas.rpc.status import mapped
from prfaas.transport.grpc_push import add_decode_servicer
from prfaas.v1 import common_pb2, common_pb2_grpc, decode_pb2, prefill_pb2, prefill_pb2_grpc

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
        return common_pb2.SetRoleResponse(previous=role_to_pb(previous), role=role_to_pb(self.node.role))

    @mapped
    async def Stats(self, request: common_pb2.NodeStatsRequest, context: Ctx) -> common_pb2.NodeStats:  # noqa: N802
        return common_pb2.NodeStats(node_id=self.node.settings.node_id, role=role_to_pb(self.node.role),
                                    **self.node.stats())


def add_servicers(node: WorkerNode, server: grpc.aio.Server) -> list[str]:
    names = [common_pb2.DESCRIPTOR.services_by_name["NodeControl"].full_name]
    common_pb2_grpc.add_NodeControlServicer_to_server(NodeControlServicer(node), server)
    if node.prefill:
        prefill_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(node.prefill), server)
        names.append(prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name)
    if node.decode:
        servicer = DecodeServicer(node.decode)
        add_decode_servicer(server, servicer, servicer.push)  # PushKv without a protobuf copy
        names.append(decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name)
    return names
