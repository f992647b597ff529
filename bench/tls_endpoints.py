"""The two ends of bench/tls_probe.py: ways to move length-prefixed frames over plain TCP and TLS.

A frame is `u32 length | 64-byte header | payload`, sent as three buffers like
prfaas/transport/tcp.py sends `u32 length | KvChunk header | payload`; the header carries the
payload's CRC-32, which the receiver verifies (zlib-ng) unless told not to. An empty frame ends the
stream; the receiver answers `b"K" | u32 frames | u32 bad CRCs` and the sender's clock stops.

Senders (`SENDERS`), each on one connection dialled before the clock starts:
- plain-sendmsg  non-blocking socket, `sendmsg` of the unjoined buffers (tcp.py today)
- plain-asyncio  asyncio stream, write + drain
- sslsock        `SSLContext.wrap_socket`, non-blocking; SSLSocket has no sendmsg, so each buffer
                 is its own `send` (the 4+64-byte header becomes one small TLS record)
- sslsock-join   the same, with header and payload joined into one bytes first (one copy more)
- bio-sendmsg    `SSLObject` over `MemoryBIO`s: encrypt 256 KiB at a time into the outgoing BIO,
                 read the ciphertext out, `sendmsg` it on the plain socket
- asyncio-tls    asyncio stream with `ssl=ctx`, write + drain
Receivers (`RECEIVERS`):
- proto          asyncio `BufferedProtocol` on a plain transport, straight into per-frame buffers
- tls-proto      the same protocol under asyncio's TLS transport (`create_server(ssl=ctx)`);
                 Python 3.11's SSLProtocol feeds a BufferedProtocol from `SSLObject.read(n, buf)`
- sslsock        non-blocking SSLSocket, `recv_into` the frame buffer, waiting with add_reader
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from typing import Any

from prfaas.transport.tcp import send_buffers
from prfaas.transport.tls_socket import ssl_call, wait_ready

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # identical values, slower
    from zlib import crc32

LEN = struct.Struct("<I")
HEADER = struct.Struct("<II56x")  # crc, seq, padding: 64 bytes
ACK = struct.Struct("<cII")
RING_BYTES = 256 << 20
BIO_SLICE = 256 << 10
SENDERS = ("plain-sendmsg", "plain-asyncio", "sslsock", "sslsock-join", "bio-sendmsg", "asyncio-tls", "aead-sendmsg")
RECEIVERS = ("proto", "tls-proto", "sslsock", "aead-proto")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- waiting on a file descriptor, TLS calls, sendmsg: the library's own ------------------------
def ready(sock: socket.socket, write: bool) -> Any:
    return wait_ready(sock, read=not write)


tls_call = ssl_call


# --- the sender --------------------------------------------------------------------------------------
class Source:
    """`total` bytes as frames of `frame` payload bytes, cut from a ring of random memory larger than
    the caches (so the payload is not cache-hot as a reused buffer would be); CRCs precomputed."""

    def __init__(self, total: int, frame: int) -> None:
        self.frame, self.count = frame, max(1, total // frame)
        slots = max(1, min(self.count, RING_BYTES // frame))
        self.ring = memoryview(bytearray(os.urandom(1 << 20)) * (slots * frame >> 20 or 1)).cast("B")
        slots = len(self.ring) // frame
        self.slots = [self.ring[i * frame : (i + 1) * frame] for i in range(slots)]
        self.crcs = [crc32(s) for s in self.slots]

    def frames(self) -> Iterator[tuple[bytes, bytes, memoryview]]:
        for i in range(self.count):
            slot = i % len(self.slots)
            yield LEN.pack(HEADER.size + self.frame), HEADER.pack(self.crcs[slot], i), self.slots[slot]

    @property
    def bytes(self) -> int:
        return self.count * (LEN.size + HEADER.size + self.frame)


def _check_ack(ack: bytes, src: Source) -> None:
    tag, frames, bad = ACK.unpack(ack)
    if tag != b"K" or frames != src.count or bad:
        raise RuntimeError(f"receiver says {tag!r}: {frames} of {src.count} frames, {bad} bad CRCs")


async def _connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = await asyncio.get_running_loop().sock_recv(sock, n - len(out))
        if not got:
            raise ConnectionError("closed before the verdict")
        out += got
    return out


async def _sslsock_recv(sock: ssl.SSLSocket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = await tls_call(sock, sock.recv, n - len(out))
        if not got:
            raise ConnectionError("closed before the verdict")
        out += got
    return out


async def send(kind: str, port: int, src: Source, ctx: ssl.SSLContext | None, server_id: str) -> dict[str, Any]:
    """Dials, handshakes, then times moving every frame until the verdict arrives."""
    t_hs = time.perf_counter()
    info: dict[str, Any] = {}
    if kind in ("plain-asyncio", "asyncio-tls"):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx if kind == "asyncio-tls" else None,
            server_hostname=server_id if kind == "asyncio-tls" else None,
        )
        info["handshake_ms"] = (time.perf_counter() - t_hs) * 1e3
        _tls_info(info, writer.get_extra_info("ssl_object"))
        t0, c0 = time.perf_counter(), cpu_s()
        for length, header, payload in src.frames():
            writer.write(length + header)
            writer.write(payload)
            await writer.drain()
        writer.write(LEN.pack(0))
        ack = await reader.readexactly(ACK.size)
        writer.close()
    else:
        sock: Any = await _connect(port)
        obj: Any = None  # the SSLSocket, the Bio, or (aead) the send key
        if kind.startswith("sslsock") or kind == "aead-sendmsg":
            assert ctx is not None
            sock = obj = ctx.wrap_socket(sock, server_hostname=server_id, do_handshake_on_connect=False)
            await tls_call(obj, obj.do_handshake)
        elif kind == "bio-sendmsg":
            assert ctx is not None
            obj = Bio(ctx, sock, server_id)
            await obj.handshake()
        info["handshake_ms"] = (time.perf_counter() - t_hs) * 1e3
        _tls_info(info, obj.obj if isinstance(obj, Bio) else obj)
        if kind == "aead-sendmsg":
            import tls_aead

            sock, obj, _ = await tls_aead.upgrade(sock, False, tls_call)  # obj: the send key
        t0, c0 = time.perf_counter(), cpu_s()
        ack = await _send_frames(kind, sock, obj, src)
        sock.close()
    info.update(seconds=time.perf_counter() - t0, cpu_s=cpu_s() - c0, bytes=src.bytes)
    _check_ack(ack, src)
    return info


def _tls_info(info: dict[str, Any], tls: ssl.SSLObject | ssl.SSLSocket | None) -> None:
    """The negotiated suite and the server's verified certificate (what authorisation reads)."""
    if tls is not None:
        cipher = tls.cipher()
        info.update(cipher=cipher[0] if cipher else None, version=tls.version(), peer=tls.getpeercert())


async def _send_frames(kind: str, sock: Any, obj: Any, src: Source) -> bytes:
    if kind in ("plain-sendmsg", "aead-sendmsg"):
        if kind == "aead-sendmsg":
            import sys

            import tls_aead

            await tls_aead.send_frames(sock, obj, src, sys.modules[__name__])
        else:
            for length, header, payload in src.frames():
                await send_buffers(sock, [length, header, payload])
        await send_buffers(sock, [LEN.pack(0)])
        return await _recv_exactly(sock, ACK.size)
    if kind == "bio-sendmsg":
        for length, header, payload in src.frames():
            await obj.write(length + header)
            for off in range(0, len(payload), BIO_SLICE):
                await obj.write(payload[off : off + BIO_SLICE])
        await obj.write(LEN.pack(0))
        return await obj.read(ACK.size)
    join = kind == "sslsock-join"
    for length, header, payload in src.frames():
        if join:
            await tls_call(sock, sock.send, b"".join((length, header, payload)))
        else:
            await tls_call(sock, sock.send, length + header)
            await tls_call(sock, sock.send, payload)  # without partial writes: all of it, or retried
    await tls_call(sock, sock.send, LEN.pack(0))
    return await _sslsock_recv(sock, ACK.size)


class Bio:
    """An SSLObject over memory BIOs driving a plain non-blocking socket."""

    def __init__(self, ctx: ssl.SSLContext, sock: socket.socket, server_id: str) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_hostname=server_id)
        self.sock = sock

    async def _flush(self) -> None:
        out = self._out.read()
        if out:
            await send_buffers(self.sock, [out])

    async def _fill(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 1 << 16)
        if not data:
            raise ConnectionError("closed during TLS")
        self._in.write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    async def write(self, data: Any) -> None:
        self.obj.write(data)  # memory BIOs never block: all of it is encrypted now
        await self._flush()

    async def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            try:
                out += self.obj.read(n - len(out))
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        return out


# --- the receiver --------------------------------------------------------------------------------------
class Frames:
    """Reads frames straight into per-frame buffers (as tcp.py's _FrameProtocol does) and checks
    each payload's CRC-32 against its header."""

    def __init__(self, verify: bool, key: Any = None) -> None:
        self.verify, self.key = verify, key  # key: tls_aead's receive key (payloads AES-GCM sealed)
        self._len = bytearray(LEN.size)
        self._buf, self._pos, self._in_frame = self._len, 0, False
        self.frames = self.bad = 0
        self.ended = False

    def buffer(self) -> memoryview:
        return memoryview(self._buf)[self._pos :]

    def advance(self, n: int) -> None:
        self._pos += n
        if self._pos < len(self._buf):
            return
        if not self._in_frame:
            size = LEN.unpack(self._len)[0]
            if size == 0:
                self.ended, self._pos = True, 0
            elif size < HEADER.size or size > 64 << 20:
                raise ValueError(f"bad frame length {size}")
            else:
                self._buf, self._pos, self._in_frame = bytearray(size), 0, True
            return
        frame = memoryview(self._buf)
        self._buf, self._pos, self._in_frame = self._len, 0, False
        payload = frame[HEADER.size :]
        if self.key is not None:
            import tls_aead

            payload = tls_aead.decrypt_frame(self.key, self.frames, frame, HEADER.size, LEN)
        self.frames += 1
        if self.verify and crc32(payload) != HEADER.unpack_from(frame)[0]:
            self.bad += 1

    def ack(self) -> bytes:
        return ACK.pack(b"K", self.frames, self.bad)


class FrameProtocol(asyncio.BufferedProtocol):
    def __init__(self, frames: Frames, done: asyncio.Future[dict[str, Any]]) -> None:
        self.frames, self.done = frames, done
        self.transport: Any = None
        self.c0 = 0.0

    def connection_made(self, transport: Any) -> None:
        self.transport, self.c0 = transport, cpu_s()  # under TLS: after the handshake

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.frames.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.frames.advance(nbytes)
        if self.frames.ended and not self.done.done():
            self.transport.write(self.frames.ack())
            self.done.set_result({"cpu_s": cpu_s() - self.c0, "peer": self.transport.get_extra_info("peercert")})

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"sender went away: {exc!r}"))


async def receive(kind: str, ctx: ssl.SSLContext | None, verify: bool, on_port: Any) -> dict[str, Any]:
    """Serves one connection on an ephemeral loopback port (`on_port(port)` once listening)."""
    loop = asyncio.get_running_loop()
    frames = Frames(verify)
    done: asyncio.Future[dict[str, Any]] = loop.create_future()
    if kind in ("proto", "tls-proto"):
        server = await loop.create_server(lambda: FrameProtocol(frames, done), "127.0.0.1", 0,
                                          ssl=ctx if kind == "tls-proto" else None)
        on_port(server.sockets[0].getsockname()[1])
        info = await done
        server.close()
    else:
        assert ctx is not None
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        on_port(lsock.getsockname()[1])
        conn, _ = await loop.sock_accept(lsock)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        await tls_call(tls, tls.do_handshake)
        if kind == "aead-proto":
            return await _receive_aead(tls, frames, done)
        c0 = cpu_s()
        while not frames.ended:
            try:
                n = tls.recv_into(frames.buffer())
            except ssl.SSLWantReadError:
                await ready(tls, False)
                continue
            if not n:
                raise ConnectionError("sender went away")
            frames.advance(n)
        info = {"cpu_s": cpu_s() - c0, "peer": tls.getpeercert()}
        await tls_call(tls, tls.send, frames.ack())
    return await _finish(info, frames)


async def _finish(info: dict[str, Any], frames: Frames) -> dict[str, Any]:
    info.update(frames=frames.frames, bad=frames.bad)
    await asyncio.sleep(0.2)  # let the verdict leave before the process exits
    return info


async def _receive_aead(tls: ssl.SSLSocket, frames: Frames, done: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
    import tls_aead

    peer = tls.getpeercert()
    sock, _, frames.key = await tls_aead.upgrade(tls, True, tls_call)
    await tls_aead.accept_plain(sock, FrameProtocol(frames, done))
    info = await done
    return await _finish({**info, "peer": peer}, frames)
