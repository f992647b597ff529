"""The CachePool gRPC servicer: message in, call the core, message out. Domain errors become gRPC
status codes in `_status_for`, the one place that knows the mapping."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc

from prfaas.cluster import CachePoolError, InvalidArgumentError, UnknownNodeError
from prfaas.cluster.client import (
    cache_event_from_pb,
    match_to_pb,
    node_info_from_pb,
    node_load_from_pb,
    node_status_to_pb,
    role_from_pb,
)
from prfaas.rpc import add_health_and_reflection, new_server
from prfaas.v1 import cachepool_pb2 as pb
from prfaas.v1 import cachepool_pb2_grpc as pb_grpc
from services.cachepool.core import CachePool

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CachePool"].full_name

R = TypeVar("R")
Ctx: TypeAlias = grpc.aio.ServicerContext


def _status_for(e: CachePoolError) -> grpc.StatusCode:
    if isinstance(e, UnknownNodeError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, InvalidArgumentError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def _mapped(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Ctx) -> R:
        try:
            return await method(self, request, context)
        except CachePoolError as e:
            await context.abort(_status_for(e), str(e))
            raise  # unreachable: abort raises

    return wrapper


class CachePoolServicer(pb_grpc.CachePoolServicer):
    def __init__(self, core: CachePool) -> None:
        self._core = core

    @_mapped
    async def Register(self, request: pb.RegisterRequest, context: Ctx) -> pb.RegisterResponse:
        if not request.HasField("node"):
            raise InvalidArgumentError("node must be set")
        r = await self._core.register(node_info_from_pb(request.node))
        return pb.RegisterResponse(heartbeat_interval_s=r.heartbeat_interval_s,
                                   heartbeat_timeout_s=r.heartbeat_timeout_s)

    @_mapped
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Ctx) -> pb.HeartbeatResponse:
        load, role = node_load_from_pb(request.load), role_from_pb(request.role)
        known = await self._core.heartbeat(request.node_id, load, role)
        return pb.HeartbeatResponse(known=known)

    @_mapped
    async def ListNodes(self, request: pb.ListNodesRequest, context: Ctx) -> pb.ListNodesResponse:
        nodes = await self._core.list_nodes(request.cluster, role_from_pb(request.role))
        return pb.ListNodesResponse(nodes=[node_status_to_pb(s) for s in nodes])

    @_mapped
    async def Publish(
        self, request_iterator: AsyncIterator[pb.CacheEvent], context: Ctx
    ) -> pb.PublishAck:
        applied = 0
        async for event in request_iterator:
            applied += await self._core.publish([cache_event_from_pb(event)])
        return pb.PublishAck(events=applied)

    @_mapped
    async def Match(self, request: pb.MatchRequest, context: Ctx) -> pb.MatchResponse:
        return match_to_pb(await self._core.match(request.token_ids))


async def start_server(core: CachePool, listen: str) -> tuple[grpc.aio.Server, int]:
    """Builds, binds and starts the server (CachePool + health + reflection); returns it and the
    bound port (useful with port 0)."""
    server = new_server()
    pb_grpc.add_CachePoolServicer_to_server(CachePoolServicer(core), server)
    add_health_and_reflection(server, [SERVICE_NAME])
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"could not bind {listen}")
    await server.start()
    return server, port
