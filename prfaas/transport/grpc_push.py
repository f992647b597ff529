"""The KV stream over gRPC: `Decode.PushKv` client streams (the sender's `GrpcPushCall`, over the
channels of `KvChannels`) and their server side (`PushKvServicer`, feeding a `KvReceiver`).

The receiver's error ends the call with the status of its code (`prfaas.rpc.status`) and the code
again in the trailing metadata key `prfaas-transfer-code`: when a write races the server's abort,
gRPC's client may see the call end as INTERNAL, and the trailer still says what happened.

Two ways to host the server side: `PushKvServicer.method_handler()` is the zero-copy `PushKv`
handler (payloads stay views of the received bytes), which the decode node registers with the rest
of its Decode service (`prfaas.rpc.handlers.add_service(..., overrides={"PushKv": ...})`);
`add_push_kv_only(server, push_kv)` hosts only `PushKv` (tests and benchmarks).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from prfaas.errors import Code
from prfaas.rpc import channel
from prfaas.rpc.status import STATUS, code_of
from prfaas.security.authz import caller
from prfaas.transport.errors import TransferError
from prfaas.transport.limits import DEFAULT_LIMITS, KvLimits
from prfaas.transport.receiver import KvReceiver
from prfaas.transport.wire import WireChunk, chunk_crc, chunk_from_message, parse_chunk
from prfaas.v1 import decode_pb2

SERVICE = "prfaas.v1.Decode"
PUSH_KV = f"/{SERVICE}/PushKv"
CODE_KEY = "prfaas-transfer-code"


# --- client side ---------------------------------------------------------------------------------
class KvChannels:
    """N channels per decode address, each its own TCP connection, kept across transfers so that
    every transfer does not pay connection setup and slow start."""

    def __init__(self, num_connections: int) -> None:
        self.num_connections = num_connections
        self._channels: dict[str, list[grpc.aio.Channel]] = {}

    def get(self, address: str, expect: str = "") -> list[grpc.aio.Channel]:
        """The channels to `address`, whose server must present the certificate of `expect`."""
        key = f"{expect}@{address}"
        if key not in self._channels:
            self._channels[key] = [channel(address, expect, own_connection=i) for i in range(self.num_connections)]
        return self._channels[key]

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for chs in channels.values():
            for ch in chs:
                await ch.close()


def _identity(data: bytes) -> bytes:
    return data


class GrpcPushCall:
    """One transfer's share of chunks on one `PushKv` stream: the sender's `PushCall` on gRPC."""

    def __init__(self, channel: grpc.aio.Channel, link: str, timeout_s: float | None) -> None:
        self.link = link
        stub = channel.stream_unary(PUSH_KV, request_serializer=_identity,
                                    response_deserializer=decode_pb2.KvAck.FromString)
        self._call = stub(timeout=timeout_s)

    async def write(self, parts: list[bytes | memoryview]) -> None:
        await self._call.write(b"".join(parts))

    async def finish(self) -> int:
        await self._call.done_writing()
        ack = await self._call
        return int(ack.bytes)

    def cancel(self) -> None:
        self._call.cancel()

    async def error(self, cause: BaseException) -> TransferError:
        """The call's final status as a TransferError (a failed write only says "Internal error
        from Core"; the status and the trailer say what the receiver saw)."""
        status, details, typed = grpc.StatusCode.OK, "", ""
        try:
            status = await asyncio.wait_for(self._call.code(), 5)
            details = await self._call.details() or ""
            typed = dict(await self._call.trailing_metadata() or ()).get(CODE_KEY, "")
        except Exception:
            if isinstance(cause, grpc.aio.AioRpcError):
                status, details = cause.code(), cause.details() or ""
                typed = dict(cause.trailing_metadata() or ()).get(CODE_KEY, "")
        if typed in Code.__members__:
            return TransferError(Code(typed), details)
        if status != grpc.StatusCode.OK:
            return TransferError(code_of(status), details)
        if isinstance(cause, TransferError):
            return cause
        return TransferError(Code.INTERNAL, repr(cause))


# --- server side ---------------------------------------------------------------------------------
def _wire_or_error(raw: bytes) -> WireChunk | TransferError:
    """Deserializer: a malformed message becomes an error the handler reports, not a crash."""
    try:
        return parse_chunk(raw)
    except TransferError as e:
        return e


def grpc_peer(context: grpc.aio.ServicerContext) -> str:
    """The default peer identity of a PushKv stream: its source address (`ipv4:HOST:PORT`)."""
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class PushKvServicer:
    """`Decode.PushKv`'s server side, under the data plane's limits: at most `max_connections`
    streams at once (`max_connections_per_peer` per peer), each chunk checked against its
    transfer before anything is decoded (`KvReceiver.check_frame`), large chunks checksummed in
    a worker thread, and a stream that sends nothing for the idle limit is ended. gRPC itself
    refuses any message over `prfaas.rpc.MAX_MESSAGE_BYTES` before it reaches the handler."""

    def __init__(self, receiver: KvReceiver, limits: KvLimits = DEFAULT_LIMITS,
                 peer_id: Callable[[grpc.aio.ServicerContext], str] = grpc_peer) -> None:
        self.receiver, self.limits, self.peer_id = receiver, limits, peer_id
        self.streams: dict[str, int] = {}

    def _admit(self, peer: str) -> str | None:
        total = sum(self.streams.values())
        if total >= self.limits.max_connections:
            return f"the decode node holds {total} PushKv streams (its limit)"
        if self.streams.get(peer, 0) >= self.limits.max_connections_per_peer:
            return f"peer {peer} holds {self.streams[peer]} PushKv streams (its limit)"
        self.streams[peer] = self.streams.get(peer, 0) + 1
        return None

    def _leave(self, peer: str) -> None:
        n = self.streams.pop(peer, 1) - 1
        if n > 0:
            self.streams[peer] = n

    async def PushKv(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> decode_pb2.KvAck:
        peer = self.peer_id(context)
        refused = self._admit(peer)
        if refused is not None:
            await _abort(context, TransferError(Code.RESOURCE_EXHAUSTED, refused))
        try:
            return await self._stream(request_iterator, context)
        finally:
            self._leave(peer)

    async def _stream(self, messages: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> decode_pb2.KvAck:
        chunks = nbytes = 0
        it = aiter(messages)
        while True:
            idle = self.limits.pooled_idle_timeout_s if chunks else self.limits.idle_timeout_s
            try:
                msg = await asyncio.wait_for(anext(it), idle)
            except StopAsyncIteration:
                break
            except TimeoutError:
                await _abort(context, TransferError(Code.DEADLINE_EXCEEDED, f"no KV chunk within {idle:g} s"))
            try:
                nbytes += await self._chunk(msg)
            except TransferError as e:
                await _abort(context, e)
            chunks += 1
        return decode_pb2.KvAck(chunks=chunks, bytes=nbytes)

    async def _chunk(self, msg: Any) -> int:
        if isinstance(msg, TransferError):
            raise msg
        chunk = msg if isinstance(msg, WireChunk) else chunk_from_message(msg)
        self.receiver.check_frame(chunk, chunk.nbytes)
        if chunk.nbytes >= self.limits.parallel_verify_bytes:
            chunk.crc = await asyncio.to_thread(chunk_crc, chunk)
        who = caller()  # the pushing node's verified identity (None: --insecure)
        return self.receiver.on_chunk(chunk, peer=who.name if who else None)

    def method_handler(self) -> grpc.RpcMethodHandler:
        """The zero-copy `PushKv` handler."""
        return grpc.stream_unary_rpc_method_handler(
            self.PushKv, request_deserializer=_wire_or_error, response_serializer=decode_pb2.KvAck.SerializeToString
        )


async def _abort(context: grpc.aio.ServicerContext, e: TransferError) -> None:
    context.set_trailing_metadata(((CODE_KEY, e.code.value),))
    await context.abort(STATUS[e.code], e.message)


def add_push_kv_only(server: grpc.aio.Server, push_kv: PushKvServicer) -> None:
    handlers = {"PushKv": push_kv.method_handler()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))



