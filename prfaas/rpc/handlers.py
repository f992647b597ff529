"""Registering a servicer from its service descriptor, with deserializers that never raise: a
request that does not parse is answered INVALID_ARGUMENT naming the method (gRPC's own handlers
answer such a request with an INTERNAL or UNKNOWN status from deep inside the library).

    add_service(server, RouterServicer(router), router_pb2.DESCRIPTOR.services_by_name["Router"])
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from prfaas.errors import InvalidRequest
from prfaas.rpc.status import abort


@dataclass(frozen=True)
class Malformed:
    """What a deserializer hands the handler instead of a message it could not parse."""

    method: str
    why: str

    def error(self) -> InvalidRequest:
        return InvalidRequest(f"malformed {self.method} request: {self.why}")


def safe_deserializer(parse: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # protobuf's DecodeError, or anything a parser raises
            return Malformed(method, str(e) or type(e).__name__)

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for r in requests:
        if isinstance(r, Malformed):
            raise r.error()
        yield r


def _wrap(fn: Callable[..., Any], m: MethodDescriptor) -> Callable[..., Any]:
    if m.client_streaming:
        if m.server_streaming:
            def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                return fn(_checked(requests), context)
            return stream_stream

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await fn(_checked(requests), context)
        return stream_unary
    if m.server_streaming:
        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await abort(context, request.error())
            async for out in fn(request, context):
                yield out
        return unary_stream

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await abort(context, request.error())
        return await fn(request, context)
    return unary_unary


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(
    server: grpc.aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    overrides: Mapping[str, grpc.RpcMethodHandler] | None = None,
) -> str:
    """Registers every method of `service` on `servicer` (or the handler given in `overrides`);
    returns the service's full name."""
    handlers: dict[str, grpc.RpcMethodHandler] = dict(overrides or {})
    for m in service.methods:
        if m.name in handlers:
            continue
        request = message_factory.GetMessageClass(m.input_type)
        response = message_factory.GetMessageClass(m.output_type)
        make = _FACTORIES[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(
            _wrap(getattr(servicer, m.name), m),
            request_deserializer=safe_deserializer(request.FromString, m.name),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
    return str(service.full_name)
