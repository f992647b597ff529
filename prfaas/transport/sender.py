"""The prefill side of the KV stream: cuts each finished layer into chunks and stripes them over
N `Decode.PushKv` client streams, each on its own TCP connection.

    sender = KvSender(address, transfer_id, layout, prompt_tokens=n, skip_tokens=cached)
    for piece in pieces_of_each_layer:      # as each layer finishes
        await sender.push(piece)            # waits only while every connection's queue is full
    stats = await sender.finish(first_token)

The chunk plan (and so `total_chunks`) follows from the layout, the token range, the wire dtype
and `max_chunk_bytes`: each full tensor is cut on a grid of `tokens_per_chunk` tokens counted from
`skip_tokens`, so a piece must start on that grid (whole-range pieces always do). The receiver's
error comes back as a gRPC status and is raised here as `TransferError` (by `push` or `finish`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from prfaas.kv.codec import (
    DEFAULT_MAX_CHUNK_BYTES,
    FULL_KINDS,
    WIRE_DTYPES,
    WIRE_EXACT,
    KvPiece,
    encode_chunk_parts,
    encode_first_token,
    plan_total_chunks,
    split_piece,
    tokens_per_chunk,
)
from prfaas.kv.layout import KvLayout
from prfaas.rpc import channel_options
from prfaas.transport.errors import TransferError
from prfaas.transport.servicer import CODE_OF, PUSH_KV, code_from_details
from prfaas.transport.stats import GLOBAL, LinkStats
from prfaas.transport.tcp import TcpPushCall, is_tcp
from prfaas.v1 import decode_pb2

DEFAULT_CONNECTIONS = 4     # chosen by bench/transport_link.py: >= 0.97 of a shaped link (docs/transport.md)
DEFAULT_QUEUE_CHUNKS = 4    # per connection: what `push` may run ahead of the network

CLIENT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 8 << 20),
)


def _identity(data: bytes) -> bytes:
    return data


class KvChannels:
    """N channels per decode address, each its own TCP connection, kept across transfers so that
    every transfer does not pay connection setup and slow start."""

    def __init__(self, num_connections: int = DEFAULT_CONNECTIONS) -> None:
        self.num_connections = num_connections
        self._channels: dict[str, list[grpc.aio.Channel]] = {}

    def get(self, address: str) -> list[grpc.aio.Channel]:
        if address not in self._channels:
            self._channels[address] = [
                grpc.aio.insecure_channel(address, options=[*channel_options(i), *CLIENT_OPTIONS])
                for i in range(self.num_connections)
            ]
        return self._channels[address]

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for chs in channels.values():
            for ch in chs:
                await ch.close()


@dataclass(frozen=True)
class TransferStats:
    bytes: int            # payload bytes (plus scales) pushed
    wire_bytes: int       # serialized message bytes
    chunks: int
    seconds: float        # first push to the last ack
    connections: int

    @property
    def goodput(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class _Connection:
    def __init__(self, link: str, call: Any, queue_chunks: int) -> None:  # a gRPC call or a TcpPushCall
        self.link = link
        self.call = call
        # a chunk's buffers and size; a gRPC call gets them joined, the TCP plane as they are
        self.queue: asyncio.Queue[tuple[list[bytes | memoryview], int] | None] = asyncio.Queue(queue_chunks)
        self.queued_bytes = 0
        self.drained = False   # the writer took the end-of-stream sentinel
        self.task: asyncio.Task[decode_pb2.KvAck | None] | None = None


class KvSender:
    def __init__(
        self,
        address: str | Sequence[str],
        transfer_id: str,
        layout: KvLayout,
        *,
        prompt_tokens: int,
        skip_tokens: int = 0,
        num_connections: int = DEFAULT_CONNECTIONS,
        wire_dtype: str = WIRE_EXACT,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        queue_chunks: int = DEFAULT_QUEUE_CHUNKS,
        timeout_s: float | None = None,
        channels: KvChannels | None = None,
        stats: LinkStats | None = GLOBAL,
    ) -> None:
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {wire_dtype!r}")
        self.addresses = [address] if isinstance(address, str) else list(address)
        self.transfer_id, self.layout = transfer_id, layout
        self.prompt_tokens, self.skip_tokens = prompt_tokens, skip_tokens
        self.num_connections = num_connections
        self.wire_dtype, self.max_chunk_bytes = wire_dtype, max_chunk_bytes
        self.queue_chunks, self.timeout_s = queue_chunks, timeout_s
        self.total_chunks = plan_total_chunks(layout, prompt_tokens, skip_tokens, wire_dtype, max_chunk_bytes)
        self._own_channels = channels is None
        self._channels = channels or KvChannels(num_connections)
        self._stats = stats
        self._conns: list[_Connection] = []
        self._seq = 0
        self._bytes = self._wire_bytes = 0
        self._error: TransferError | None = None
        self._closed = False
        self._t0 = 0.0

    async def __aenter__(self) -> KvSender:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None or not self._closed:
            await self.abort()

    # --- the caller's side ------------------------------------------------------------------------
    async def push(self, piece: KvPiece) -> None:
        """Encodes one layer's tensor and queues its chunks; returns once they are queued."""
        try:
            await self._push(piece)
        except TransferError:
            await self.abort()
            raise

    async def _push(self, piece: KvPiece) -> None:
        self._check()
        self._start()
        tpc = self.max_chunk_bytes
        if piece.kind in FULL_KINDS:
            tpc = tokens_per_chunk(self.layout, piece.layer, self.wire_dtype, self.max_chunk_bytes)
            if (piece.token_start - self.skip_tokens) % tpc:
                raise ValueError(f"piece starts at token {piece.token_start}, off the {tpc}-token chunk grid")
        for part in split_piece(piece, tpc, self.skip_tokens):
            if self._seq >= self.total_chunks - 1:
                raise ValueError(f"more chunks than planned ({self.total_chunks}): a piece was pushed twice?")
            parts = encode_chunk_parts(self.transfer_id, self._seq, self.total_chunks, part, self.wire_dtype)
            self._seq += 1
            self._bytes += part.tensor.numel() * part.tensor.element_size()
            await self._enqueue(parts)

    async def finish(self, first_token: int) -> TransferStats:
        """Sends the first token, closes the streams and waits for every acknowledgement."""
        try:
            return await self._finish(first_token)
        except TransferError:
            await self.abort()
            raise

    async def _finish(self, first_token: int) -> TransferStats:
        self._check()
        self._start()
        if self._seq != self.total_chunks - 1:
            await self.abort()
            raise ValueError(f"finish after {self._seq} chunks, {self.total_chunks - 1} planned")
        await self._enqueue([encode_first_token(self.transfer_id, self._seq, self.total_chunks, first_token)])
        self._seq += 1
        for c in self._conns:
            await c.queue.put(None)
        acks = await asyncio.gather(*(c.task for c in self._conns if c.task is not None))
        if self._error is not None:
            raise self._error
        seconds = time.perf_counter() - self._t0
        await self._close()
        for c, ack in zip(self._conns, acks, strict=True):
            if self._stats is not None and ack is not None:
                self._stats.record_acked(c.link, ack.bytes)
        if self._stats is not None:
            self._stats.record_transfer(self.addresses[0], ok=True)
        return TransferStats(self._bytes, self._wire_bytes, self._seq, seconds, len(self._conns))

    async def abort(self) -> None:
        """Cancels every stream and closes owned channels. A cancelled stream looks like a closed
        one to the receiver (gRPC Python reports EOF), so the decode side drops the transfer when
        the router cancels its Admit (`Transfer.wait()` cancelled) or at the deadline."""
        if self._closed:
            return
        for c in self._conns:
            c.call.cancel()
            if c.task is not None:
                c.task.cancel()
        await asyncio.gather(*(c.task for c in self._conns if c.task is not None), return_exceptions=True)
        if self._stats is not None and self._conns:
            self._stats.record_transfer(self.addresses[0], ok=False)
        await self._close()

    # --- internals ----------------------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise TransferError("CANCELLED", f"transfer {self.transfer_id} is closed")

    def _start(self) -> None:
        if self._conns:
            return
        self._t0 = time.perf_counter()
        for i in range(self.num_connections):
            address = self.addresses[i % len(self.addresses)]
            if is_tcp(address):  # the raw-TCP data plane (prfaas/transport/tcp.py)
                call: Any = TcpPushCall(address, self.timeout_s, self._stats)
            else:
                channel = self._channels.get(address)[i % self._channels.num_connections]
                stub = channel.stream_unary(PUSH_KV, request_serializer=_identity,
                                            response_deserializer=decode_pb2.KvAck.FromString)
                call = stub(timeout=self.timeout_s)
            conn = _Connection(address, call, self.queue_chunks)
            conn.task = asyncio.create_task(self._write(conn))
            self._conns.append(conn)

    async def _enqueue(self, parts: list[bytes | memoryview]) -> None:
        size = sum(len(p) for p in parts)
        conn = min(self._conns, key=lambda c: c.queued_bytes)
        conn.queued_bytes += size
        self._wire_bytes += size
        await conn.queue.put((parts, size))
        self._check()

    async def _write(self, conn: _Connection) -> decode_pb2.KvAck | None:
        tcp = isinstance(conn.call, TcpPushCall)
        try:
            while (item := await conn.queue.get()) is not None:
                parts, size = item
                # the TCP plane sends the buffers as they are (one sendmsg); gRPC wants one bytes
                await conn.call.write(parts if tcp else b"".join(parts))
                conn.queued_bytes -= size
                if self._stats is not None:
                    self._stats.record_sent(conn.link, size)
            conn.drained = True
            await conn.call.done_writing()
            return await conn.call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # abort() stops this writer
                raise
            # the call ended under the writer: report the receiver's status when it gave one
            error = self._error or await self._status_error(
                conn, TransferError("CANCELLED", f"transfer {self.transfer_id}: stream cancelled")
            )
            await self._fail(conn, error)
            return None
        except Exception as e:
            await self._fail(conn, await self._status_error(conn, e))
            return None

    async def _fail(self, conn: _Connection, error: TransferError) -> None:
        if self._error is None:
            self._error = error
            for c in self._conns:  # the transfer is lost: stop the other streams too
                c.call.cancel()
        while not conn.drained:  # unblock a `push` waiting on this queue, up to `finish`'s sentinel
            conn.drained = await conn.queue.get() is None

    async def _status_error(self, conn: _Connection, e: Exception) -> TransferError:
        """The call's final status (a failed write only says "Internal error from Core"). The
        receiver puts its error code in the details too, which wins over the status code."""
        code, details = grpc.StatusCode.OK, ""
        try:
            code = await asyncio.wait_for(conn.call.code(), 5)
            details = await conn.call.details() or ""
        except Exception:
            if isinstance(e, grpc.aio.AioRpcError):
                code, details = e.code(), e.details() or ""
        wire_code = code_from_details(details)
        if wire_code is not None:
            return TransferError(wire_code, details.partition(": ")[2])
        if code != grpc.StatusCode.OK:
            return TransferError(CODE_OF.get(code, "INTERNAL"), details)
        if isinstance(e, TransferError):
            return e
        return TransferError("INTERNAL", repr(e))

    async def _close(self) -> None:
        self._closed = True
        if self._own_channels:
            await self._channels.close()
