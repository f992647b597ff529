"""The gRPC edge of the KV stream on the decode node: `PushKv` feeds a `KvReceiver`.

`TransferError` codes map to gRPC status codes here and nowhere else. Two ways to host it:
  - `add_decode_servicer(server, decode_servicer, push_kv)` registers the whole Decode service with
    the zero-copy `PushKv` handler (payloads stay views of the received bytes);
  - or the generated `add_DecodeServicer_to_server` with a servicer whose `PushKv` delegates to
    `PushKvServicer.PushKv` (protobuf parses the chunk: one more copy of the payload).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from prfaas.kv.codec import CodecError, WireChunk, chunk_from_message, parse_chunk
from prfaas.transport.errors import ErrorCode, TransferError
from prfaas.transport.receiver import KvReceiver
from prfaas.v1 import decode_pb2

SERVICE = "prfaas.v1.Decode"
PUSH_KV = f"/{SERVICE}/PushKv"

STATUS_OF: dict[ErrorCode, grpc.StatusCode] = {
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "DATA_LOSS": grpc.StatusCode.DATA_LOSS,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "CANCELLED": grpc.StatusCode.CANCELLED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}
CODE_OF: dict[grpc.StatusCode, ErrorCode] = {v: k for k, v in STATUS_OF.items()}

# Server options for the decode node's server: bigger HTTP/2 frames and reads for MiB messages.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 8 << 20),
)


def wire_details(e: TransferError) -> str:
    """The status details carry the code too: when a write races the server's abort, gRPC's
    client may report the call as INTERNAL with the server's details, and the sender reads the
    code back from here (`code_from_details`)."""
    return f"{e.code}: {e.message}"


def code_from_details(details: str) -> ErrorCode | None:
    head, sep, _ = details.partition(": ")
    return head if sep and head in STATUS_OF else None  # type: ignore[return-value]


def _wire_or_error(raw: bytes) -> WireChunk | CodecError:
    """Deserializer: a malformed message becomes an error the handler reports, not a crash."""
    try:
        return parse_chunk(raw)
    except CodecError as e:
        return e


class PushKvServicer:
    def __init__(self, receiver: KvReceiver) -> None:
        self.receiver = receiver

    async def PushKv(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> decode_pb2.KvAck:
        chunks = nbytes = 0
        async for msg in request_iterator:
            try:
                if isinstance(msg, CodecError):
                    raise TransferError(msg.code, str(msg))  # type: ignore[arg-type]
                chunk = msg if isinstance(msg, WireChunk) else chunk_from_message(msg)
                nbytes += self.receiver.on_chunk(chunk)
            except TransferError as e:
                await context.abort(STATUS_OF[e.code], wire_details(e))
            chunks += 1
        return decode_pb2.KvAck(chunks=chunks, bytes=nbytes)

    def method_handler(self) -> grpc.RpcMethodHandler:
        """The zero-copy `PushKv` handler."""
        return grpc.stream_unary_rpc_method_handler(
            self.PushKv, request_deserializer=_wire_or_error, response_serializer=decode_pb2.KvAck.SerializeToString
        )


def add_push_kv_only(server: grpc.aio.Server, push_kv: PushKvServicer) -> None:
    """A server hosting only `Decode.PushKv` (tests and benchmarks)."""
    handlers = {"PushKv": push_kv.method_handler()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def add_decode_servicer(server: grpc.aio.Server, decode_servicer: Any, push_kv: PushKvServicer) -> None:
    """The Decode service: `Admit` and `Stats` from `decode_servicer` (generated messages),
    `PushKv` from `push_kv` (zero-copy). Use instead of `add_DecodeServicer_to_server`."""
    pb = decode_pb2
    handlers = {
        "Admit": grpc.unary_stream_rpc_method_handler(
            decode_servicer.Admit,
            request_deserializer=pb.AdmitRequest.FromString,
            response_serializer=pb.AdmitEvent.SerializeToString,
        ),
        "PushKv": push_kv.method_handler(),
        "Stats": grpc.unary_unary_rpc_method_handler(
            decode_servicer.Stats,
            request_deserializer=pb.StatsRequest.FromString,
            response_serializer=pb.StatsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
