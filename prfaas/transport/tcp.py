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

from prfaas.errors import Code
from prfaas.obs.log import get_logger
from prfaas.security import tls
from prfaas.transport.errors import TransferError
from prfaas.transport.frames import ACK as _ACK
from prfaas.transport.frames import LEN as _LEN
from prfaas.transport.frames import FrameProtocol, Gate, PeerId, peer_address
from prfaas.transport.limits import DEFAULT_LIMITS, KvLimits
from prfaas.transport.pool import loop_pool
from prfaas.transport.receiver import KvReceiver
from prfaas.transport.stats import LinkStats
from prfaas.transport.tls_socket import send_tls, ssl_call, tls_connect
from prfaas.transport.tls_socket import wait_ready as _writable

log = get_logger(__name__)

SCHEME = "tcp://"
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
        self._busy = False  # inside write or finish (see cancel)

    async def _connect(self) -> None:
        if self._sock is not None:
            return
        pooled = loop_pool().take((self._host, self._port))  # a quiet idle one (prfaas/transport/pool.py)
        if pooled is not None:
            self._sock = pooled
            self._retrans_base = tcp_retransmits(pooled)
            return
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
        self._busy = True
        try:
            await self._connect()
            self._check()
            assert self._sock is not None
            await send_buffers(self._sock, [_LEN.pack(sum(len(p) for p in parts)), *parts])
        except (OSError, TimeoutError) as e:
            await self._read_verdict()  # the receiver may have said why it closed
            raise self._broken(e) from e
        finally:
            self._settle()

    async def finish(self) -> int:
        """Ends this connection's share (the end frame) and returns the bytes the receiver
        acknowledged; raises the receiver's `TransferError`."""
        self._busy = True
        try:
            await self._connect()
            self._check()
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
        finally:
            self._settle()

    def _check(self) -> None:
        if self._error is not None:  # cancelled (or failed) while connecting
            raise self._error

    def _settle(self) -> None:
        """After each I/O call: a connection that was cancelled during it is closed now."""
        self._busy = False
        if self._error is not None:
            self._close()

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
            chunks, nbytes = _ACK.unpack(body[1:])
            self._release(pool=chunks > 0)
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

    def _release(self, pool: bool = True) -> None:
        """A clean verdict: the connection goes back to the pool for the next transfer (unless it
        carried no chunk: the receiver gives such connections only a short idle limit)."""
        if self._sock is None:
            return
        self._count_retransmits()
        if pool:
            loop_pool().give((self._host, self._port), self._sock)
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
        """Stops this connection's share. An I/O call waiting on the socket (for room to write, or
        for the verdict) must wake: shutting the socket down makes it readable and writable, the
        call fails and closes it (`_settle`). Closing at once would drop its registration with the
        loop and leave it waiting for ever."""
        self._fail(TransferError(Code.CANCELLED, "the sender cancelled the transfer"))
        sock = self._sock
        if self._busy and sock is not None and sock.fileno() != -1:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # below TLS: the ssl object stays as it is
                return
            except OSError:
                pass
        self._close()

    async def error(self, cause: BaseException) -> TransferError:
        if self._error is not None:
            return self._error
        return cause if isinstance(cause, TransferError) else TransferError(Code.UNAVAILABLE, repr(cause))


class KvTcpServer:
    """The decode node's TCP data port: every connection feeds the same `KvReceiver`."""

    def __init__(self, receiver: KvReceiver, limits: KvLimits = DEFAULT_LIMITS, peer_id: PeerId = peer_address) -> None:
        self.receiver = receiver
        self.gate = Gate(receiver, limits, peer_id)  # the limits (prfaas/transport/frames.py); peer_id: the cap's key
        self._server: asyncio.Server | None = None
        self._conns: set[FrameProtocol] = set()
        self.accepted = 0  # connections accepted (pooled senders reuse theirs)

    async def start(self, host: str, port: int = 0) -> int:
        loop = asyncio.get_running_loop()

        def make() -> FrameProtocol:
            self.accepted += 1
            p = FrameProtocol(self.gate, self._conns.discard)
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
