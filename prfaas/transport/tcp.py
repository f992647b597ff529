"""A raw-TCP data plane for the KV stream, beside gRPC `PushKv`.

Python gRPC moves about 1 GB/s per process however the messages are sized (docs/transport.md),
while a plain asyncio socket moves several. This carries the very same `KvChunk` bytes (the codec
is unchanged, so is the receiver's verification) as length-prefixed frames on plain TCP
connections; gRPC keeps the control path (Admit, Prefill, the errors' status codes).

Wire, per connection and transfer: frames `u32 little-endian length | KvChunk bytes`, then an
empty frame (length 0) that ends the sender's share; the receiver answers one verdict frame:
`b"K" + u32 chunks + u64 bytes` on success (the connection stays open and goes back to the
sender's pool for the next transfer: no handshake or slow start per transfer on a long link), or
`b"E" + u8 code + message` (a TransferError: the code's canonical number, then its UTF-8 message)
at the first bad chunk, and closes. A connection that closes in the middle of a transfer is a
broken transfer (the sender aborted or died): the receiver cancels what it carried, which gRPC's
client streams cannot say.

`TcpPushCall` is the sender's `PushCall` on this plane (an address `tcp://host:port` selects it),
so the sender's chunking, striping and error rules apply as they are. It writes on a plain
non-blocking socket with `sendmsg`, each chunk's header and payload as separate buffers: the
payload is never joined or buffered in user space. `KvTcpServer` feeds a `KvReceiver`.

Mutual TLS 1.3 by default (the process's `prfaas.security.tls` configuration; plaintext only with
--insecure): the sender wraps each new connection in an `ssl` socket that verifies the decode
node's certificate against the cluster CA and its node id (`expect`), and writes each buffer with
`send` (an SSLSocket has no `sendmsg`; a write it could not finish is retried with the same
buffer, as OpenSSL requires); the receiver is asyncio's TLS transport under the same
BufferedProtocol, which reads the sender's node id from its verified certificate and hands it to
`KvReceiver.on_chunk`: a chunk from any node but the one the router named is refused.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import weakref
from collections.abc import Callable

from prfaas.errors import Code
from prfaas.obs.log import get_logger
from prfaas.security import tls
from prfaas.transport.errors import TransferError
from prfaas.transport.receiver import KvReceiver
from prfaas.transport.stats import LinkStats
from prfaas.transport.tls_socket import idle_tls_usable, send_tls, ssl_call, tls_connect
from prfaas.transport.tls_socket import wait_ready as _writable
from prfaas.transport.wire import parse_chunk

log = get_logger(__name__)

SCHEME = "tcp://"
_LEN = struct.Struct("<I")
_ACK = struct.Struct("<IQ")
MAX_FRAME = 256 << 20
SOCKET_BUFFER = 4 << 20


_TCPI_TOTAL_RETRANS = 100  # offset of tcpi_total_retrans (u32) in Linux's struct tcp_info


def tcp_retransmits(sock: socket.socket | None) -> int:
    """Segments this connection retransmitted (Linux TCP_INFO); 0 where that is not available.
    The router's short-term controller reads their rate as the link's congestion signal."""
    opt = getattr(socket, "TCP_INFO", None)
    if sock is None or opt is None:
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, opt, 104)
    except OSError:
        return 0
    return int(struct.unpack_from("<I", info, _TCPI_TOTAL_RETRANS)[0]) if len(info) >= 104 else 0


def is_tcp(address: str) -> bool:
    return address.startswith(SCHEME)


_IDLE: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, int], list[socket.socket]]] = (
    weakref.WeakKeyDictionary()
)
MAX_IDLE_PER_ADDRESS = 16


def _idle(host: str, port: int) -> list[socket.socket]:
    """Idle connections to one data port, per event loop."""
    return _IDLE.setdefault(asyncio.get_running_loop(), {}).setdefault((host, port), [])


def _usable(sock: socket.socket) -> bool:
    """An idle pooled connection is usable when the peer has neither closed it nor sent anything."""
    if isinstance(sock, ssl.SSLSocket):  # no MSG_PEEK under TLS
        return idle_tls_usable(sock)
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"": closed; bytes: out of turn
    except (BlockingIOError, InterruptedError):
        return True  # nothing to read: open and quiet
    except OSError:
        pass
    return False


async def send_buffers(sock: socket.socket, buffers: list[bytes | memoryview]) -> None:
    """Sends the buffers back to back on a non-blocking socket with `sendmsg`, without joining
    them: the payload goes from the tensor's memory to the kernel in one copy (asyncio's transports
    join or buffer what the socket does not take at once, a second copy of every chunk)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    if isinstance(sock, ssl.SSLSocket):
        return await send_tls(sock, views)
    while views:
        try:
            sent = sock.sendmsg(views)
        except (BlockingIOError, InterruptedError):
            await _writable(sock)
            continue
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        if isinstance(sock, ssl.SSLSocket):
            got = await ssl_call(sock, sock.recv, n - len(out))
        else:
            got = await loop.sock_recv(sock, n - len(out))
        if not got:
            raise ConnectionError(f"connection closed after {len(out)} of {n} bytes")
        out += got
    return bytes(out)


class TcpPushCall:
    """One transfer's share of chunks on one TCP connection (a plain non-blocking socket), taken
    from (and, after a clean verdict, given back to) a per-address pool."""

    def __init__(self, address: str, timeout_s: float | None = None, stats: LinkStats | None = None,
                 expect: str = "") -> None:
        self.link, self.expect = address, expect
        self.stats, self.retransmits = stats, 0
        host, _, port = address.removeprefix(SCHEME).rpartition(":")
        self._host, self._port, self._timeout = host, int(port), timeout_s
        self._sock: socket.socket | None = None
        self._retrans_base = 0
        self._error: TransferError | None = None

    async def _connect(self) -> None:
        if self._sock is not None:
            return
        idle = _idle(self._host, self._port)
        while idle:
            sock = idle.pop()
            if _usable(sock):
                self._sock = sock
                self._retrans_base = tcp_retransmits(sock)
                return
            sock.close()
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(loop.sock_connect(sock, addr), self._timeout)
            if not tls.current().insecure:
                sock = await tls_connect(sock, self.expect or self._host, self._timeout)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def _fail(self, error: TransferError) -> TransferError:
        if self._error is None:
            self._error = error
        return self._error

    def _broken(self, e: BaseException) -> TransferError:
        if isinstance(e, ssl.SSLCertVerificationError):  # not the node it should be: never retry there
            return self._fail(TransferError(Code.PERMISSION_DENIED, f"KV connection to {self._host}:{self._port}: "
                                            f"{e.verify_message} (expected {self.expect or self._host})"))
        return self._fail(TransferError(Code.UNAVAILABLE, f"KV connection to {self._host}:{self._port}: {e!r}"))

    async def write(self, parts: list[bytes | memoryview]) -> None:
        """One frame: a chunk as the buffers of `encode_chunk_parts`, sent unjoined."""
        try:
            await self._connect()
            assert self._sock is not None
            await send_buffers(self._sock, [_LEN.pack(sum(len(p) for p in parts)), *parts])
        except (OSError, TimeoutError) as e:
            await self._read_verdict()  # the receiver may have said why it closed
            raise self._broken(e) from e

    async def finish(self) -> int:
        """Ends this connection's share (the end frame) and returns the bytes the receiver
        acknowledged; raises the receiver's `TransferError`."""
        await self._connect()
        assert self._sock is not None
        try:
            await send_buffers(self._sock, [_LEN.pack(0)])
        except OSError as e:
            await self._read_verdict()
            raise self._broken(e) from e
        acked = await self._read_verdict()
        if acked is None:
            assert self._error is not None
            raise self._error
        return acked

    async def _read_verdict(self) -> int | None:
        """The receiver's verdict: acknowledged bytes, or None after recording its error."""
        if self._sock is None or self._error is not None:
            return None
        try:
            head = await asyncio.wait_for(_recv_exactly(self._sock, _LEN.size), self._timeout)
            body = await asyncio.wait_for(_recv_exactly(self._sock, _LEN.unpack(head)[0]), self._timeout)
        except (OSError, TimeoutError) as e:
            self._close()
            self._fail(TransferError(Code.UNAVAILABLE, f"no verdict from {self._host}:{self._port}: {e!r}"))
            return None
        if body[:1] == b"K" and len(body) == 1 + _ACK.size:
            _chunks, nbytes = _ACK.unpack(body[1:])
            self._release()
            return int(nbytes)
        self._close()
        if body[:1] == b"E" and len(body) >= 2:
            self._fail(TransferError(Code.from_number(body[1]), body[2:].decode("utf-8", "replace")))
        else:
            self._fail(TransferError(Code.INTERNAL, f"bad verdict frame from {self._host}:{self._port}"))
        return None

    def _count_retransmits(self) -> None:
        assert self._sock is not None
        self.retransmits = tcp_retransmits(self._sock) - self._retrans_base
        if self.stats is not None and self.retransmits > 0:
            self.stats.record_retransmits(f"{self._host}:{self._port}", self.retransmits)

    def _release(self) -> None:
        """A clean verdict: the connection goes back to the pool for the next transfer."""
        if self._sock is None:
            return
        self._count_retransmits()
        idle = _idle(self._host, self._port)
        if len(idle) < MAX_IDLE_PER_ADDRESS:
            idle.append(self._sock)
        else:
            self._sock.close()
        self._sock = None

    def _close(self) -> None:
        if self._sock is not None and self._sock.fileno() != -1:
            self._count_retransmits()
            try:  # a writer waiting for room must not stay registered on a closed (reusable) fd
                asyncio.get_running_loop().remove_writer(self._sock.fileno())
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except RuntimeError:
                pass
            self._sock.close()

    def cancel(self) -> None:
        self._close()
        self._fail(TransferError(Code.CANCELLED, "the sender cancelled the transfer"))

    async def error(self, cause: BaseException) -> TransferError:
        if self._error is not None:
            return self._error
        return cause if isinstance(cause, TransferError) else TransferError(Code.UNAVAILABLE, repr(cause))


class _FrameProtocol(asyncio.BufferedProtocol):
    """Reads length-prefixed frames straight into per-frame buffers (no stream-reader copies)
    and hands each chunk to the receiver as it completes."""

    def __init__(self, receiver: KvReceiver, on_close: Callable[[_FrameProtocol], None]) -> None:
        self.receiver, self.on_close = receiver, on_close
        self.transport: asyncio.Transport | None = None
        self._header = bytearray(_LEN.size)
        self._buf = self._header
        self._pos = 0
        self._frame = False
        self.chunks = self.bytes = 0
        self._seen: set[str] = set()
        self._finished = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        cfg = tls.current()  # under TLS (after the handshake): the sender's verified node id
        who = None if cfg.insecure else cfg.peer(transport.get_extra_info("peercert"))
        self.peer: str | None = None if cfg.insecure else who.name if who else ""

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buf)[self._pos :]

    def buffer_updated(self, nbytes: int) -> None:
        self._pos += nbytes
        if self._pos < len(self._buf) or self._finished:
            return
        if not self._frame:
            size = _LEN.unpack(self._header)[0]
            if size == 0:  # the end frame: verdict, then the connection waits for the next transfer
                ack = b"K" + _ACK.pack(self.chunks, self.bytes)
                self.chunks = self.bytes = self._pos = 0
                self._seen.clear()
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(_LEN.pack(len(ack)) + ack)
                return
            if size > MAX_FRAME:
                return self._reply_error(TransferError(Code.INVALID_ARGUMENT, f"bad KV frame length {size}"))
            self._buf, self._pos, self._frame = bytearray(size), 0, True
            return
        data, self._buf, self._pos, self._frame = self._buf, self._header, 0, False
        try:
            chunk = parse_chunk(data)
            self._seen.add(chunk.transfer_id)
            self.bytes += self.receiver.on_chunk(chunk, peer=self.peer)
            self.chunks += 1
        except TransferError as e:
            self._reply_error(e)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._finished:  # the sender went away mid-transfer (nothing seen: an idle close)
            for tid in self._seen:
                self.receiver.cancel(tid, "the sender's KV connection broke")
        self.on_close(self)

    def _reply_error(self, e: TransferError) -> None:
        self._finished = True
        self._reply(b"E" + bytes([e.code.number]) + e.message.encode())

    def _reply(self, body: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_LEN.pack(len(body)) + body)
            self.transport.close()


class KvTcpServer:
    """The decode node's TCP data port: every connection feeds the same `KvReceiver`."""

    def __init__(self, receiver: KvReceiver) -> None:
        self.receiver = receiver
        self._server: asyncio.Server | None = None
        self._conns: set[_FrameProtocol] = set()
        self.accepted = 0  # connections accepted (pooled senders reuse theirs)

    async def start(self, host: str, port: int = 0) -> int:
        loop = asyncio.get_running_loop()

        def make() -> _FrameProtocol:
            self.accepted += 1
            p = _FrameProtocol(self.receiver, self._conns.discard)
            self._conns.add(p)
            return p

        cfg = tls.current()
        ctx = None if cfg.insecure else cfg.server_context()
        self._server = await loop.create_server(make, host, port, reuse_address=True, ssl=ctx,
                                                ssl_handshake_timeout=tls.HANDSHAKE_TIMEOUT_S if ctx else None)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for p in list(self._conns):
                if p.transport is not None:
                    p.transport.close()
            await self._server.wait_closed()
