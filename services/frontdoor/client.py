"""The front door's gRPC client of the router: `Router.Generate` as an async iterator of
`RouterChunk`s, gRPC status codes mapped to the OpenAI errors the HTTP side answers with."""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prfaas.rpc import channel
from prfaas.rpc.convert import logprob_from_pb, sampling_fields
from prfaas.v1 import common_pb2, router_pb2, router_pb2_grpc

from . import protocol
from .core import RouterChunk, RouterRequest

RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata the router sets on RESOURCE_EXHAUSTED

_ERRORS: dict[grpc.StatusCode, type[protocol.ApiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: protocol.BadRequest,
    grpc.StatusCode.OUT_OF_RANGE: protocol.BadRequest,
    grpc.StatusCode.FAILED_PRECONDITION: protocol.BadRequest,
    grpc.StatusCode.UNAUTHENTICATED: protocol.Unauthorized,
    grpc.StatusCode.PERMISSION_DENIED: protocol.Forbidden,
    grpc.StatusCode.RESOURCE_EXHAUSTED: protocol.RateLimited,
    grpc.StatusCode.UNAVAILABLE: protocol.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: protocol.Timeout,
}
_ROUTES = {common_pb2.LOCAL: "local", common_pb2.PRFAAS: "prfaas"}


def retry_after_s(metadata: grpc.aio.Metadata | None) -> int | None:
    """Seconds (rounded up, at least 1) from the router's `retry-after-ms` trailer, if any."""
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(1, math.ceil(float(value) / 1000.0))
            except ValueError:
                return None
    return None


def api_error(e: grpc.aio.AioRpcError) -> protocol.ApiError:
    kind = _ERRORS.get(e.code(), protocol.ApiError)
    retry = retry_after_s(e.trailing_metadata()) if kind is protocol.RateLimited else None
    if kind is protocol.RateLimited and retry is None:
        retry = 1
    return kind(f"router: {e.details() or e.code().name}", code=e.code().name.lower(), retry_after_s=retry)


def to_pb(req: RouterRequest) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(request_id=req.request_id, token_ids=req.token_ids, **sampling_fields(req))


class GrpcRouter:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = channel(address, expect="router")  # as the front door's identity
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    async def generate(self, req: RouterRequest) -> AsyncGenerator[RouterChunk, None]:
        call = self._stub.Generate(to_pb(req))
        try:
            async for msg in call:
                yield RouterChunk(
                    list(msg.token_ids),
                    msg.finish_reason,
                    _ROUTES.get(msg.route, ""),
                    msg.cached_tokens,
                    [logprob_from_pb(x) for x in msg.logprobs],
                )
        except grpc.aio.AioRpcError as e:
            raise api_error(e) from None
        finally:
            call.cancel()  # a closed stream (stop string, client gone) ends the router's work too

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        """The router's gRPC health: SERVING."""
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self._channel.close()
