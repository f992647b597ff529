"""The CachePool gRPC servicer: message in, call the core, message out. Domain errors become
status codes in `prfaas.rpc.status`, the one table every service uses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TypeAlias

import grpc

from prfaas.cluster import InvalidArgumentError
from prfaas.rpc.convert import (
    cache_event_from_pb,
    match_to_pb,
    node_info_from_pb,
    node_load_from_pb,
    node_status_to_pb,
    role_from_pb,
)
from prfaas.rpc.handlers import add_service
from prfaas.rpc.status import mapped
from prfaas.security.authz import require_self
from prfaas.v1 import cachepool_pb2 as pb
from prfaas.v1 import cachepool_pb2_grpc as pb_grpc

from .core import CachePool

Ctx: TypeAlias = grpc.aio.ServicerContext


class CachePoolServicer(pb_grpc.CachePoolServicer):
    def __init__(self, core: CachePool) -> None:
        self._core = core

    @mapped
    async def Register(self, request: pb.RegisterRequest, context: Ctx) -> pb.RegisterResponse:
        if not request.HasField("node"):
            raise InvalidArgumentError("node must be set")
        require_self(request.node.node_id, "register")
        r = await self._core.register(node_info_from_pb(request.node))
        return pb.RegisterResponse(heartbeat_interval_s=r.heartbeat_interval_s,
                                   heartbeat_timeout_s=r.heartbeat_timeout_s)

    @mapped
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Ctx) -> pb.HeartbeatResponse:
        require_self(request.node_id, "heartbeat")
        load, role = node_load_from_pb(request.load), role_from_pb(request.role)
        known = await self._core.heartbeat(request.node_id, load, role, request.draining)
        return pb.HeartbeatResponse(known=known)

    @mapped
    async def ListNodes(self, request: pb.ListNodesRequest, context: Ctx) -> pb.ListNodesResponse:
        nodes = await self._core.list_nodes(request.cluster, role_from_pb(request.role))
        return pb.ListNodesResponse(nodes=[node_status_to_pb(s) for s in nodes])

    @mapped
    async def Publish(self, request_iterator: AsyncIterator[pb.CacheEvent], context: Ctx) -> pb.PublishAck:
        applied = 0
        async for event in request_iterator:
            require_self(event.node_id, "publish cache events")
            applied += await self._core.publish([cache_event_from_pb(event)])
        return pb.PublishAck(events=applied)

    @mapped
    async def Match(self, request: pb.MatchRequest, context: Ctx) -> pb.MatchResponse:
        return match_to_pb(await self._core.match(request.token_ids))


def add_servicers(core: CachePool) -> Callable[[grpc.aio.Server], list[str]]:
    """The `add_servicers` callback of `prfaas.rpc.serve` for this service."""

    def add(server: grpc.aio.Server) -> list[str]:
        return [add_service(server, CachePoolServicer(core), pb.DESCRIPTOR.services_by_name["CachePool"])]

    return add
