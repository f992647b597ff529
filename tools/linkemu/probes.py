"""The tools `tools/linkemu` runs inside its network namespaces, by file path (standard library
only): `proxy`, a TCP forwarding proxy that delays each direction (the kernel here has no netem),
and the measurement probes `sink`, `source`, `echo` and `ping`.

    python tools/linkemu/probes.py proxy --listen 0.0.0.0:0 --target HOST:PORT --delay-ms 15
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import socket
import sys
import time
from typing import Any

_READ_CHUNK = 1 << 20

# -- the delay proxy ---------------------------------------------------------------------------


class _Pipe:
    """One direction of a proxied connection: each chunk read from the source is written to the
    destination `delay` seconds after it arrived. Reading pauses while more than `max_buffer`
    bytes wait or the destination's write buffer is full."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, max_buffer: int, on_done: Any) -> None:
        self.loop, self.delay, self.max_buffer, self.on_done = loop, delay, max_buffer, on_done
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.dst_full = False
        self.src_paused = False
        self.done = False

    def feed(self, data: bytes | None) -> None:
        """Queues `data` (None: end of stream)."""
        if self.done or (data is None and self.queue and self.queue[-1][1] is None):
            return
        if self.delay <= 0 and not self.queue:
            self._deliver([data])
            return
        self.queue.append((self.loop.time() + self.delay, data))
        self.queued += len(data) if data else 0
        if self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)
        self._update_reading()

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        due: list[bytes | None] = []
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            self.queued -= len(data) if data else 0
            due.append(data)
        self._deliver(due)
        if self.queue and not self.done:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)
        self._update_reading()

    def _deliver(self, chunks: list[bytes | None]) -> None:
        assert self.dst is not None
        data = [c for c in chunks if c is not None]
        if data and not self.dst.is_closing():
            self.dst.writelines(data)
        if chunks and chunks[-1] is None:
            if self.dst.can_write_eof() and not self.dst.is_closing():
                try:
                    self.dst.write_eof()
                except OSError:  # the far side already went (ENOTCONN): nothing left to tell it
                    pass
            self.drop()

    def drop(self) -> None:
        """Ends this direction (its destination is gone or its end of stream was delivered)."""
        if self.done:
            return
        self.done = True
        self.queue.clear()
        self.queued = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.on_done()

    def set_dst_full(self, full: bool) -> None:
        self.dst_full = full
        self._update_reading()

    def _update_reading(self) -> None:
        if self.src is None or self.src.is_closing():
            return
        pause = self.queued > self.max_buffer or self.dst_full
        if pause != self.src_paused:
            self.src_paused = pause
            (self.src.pause_reading if pause else self.src.resume_reading)()


class _End(asyncio.Protocol):
    """One socket of a proxied connection: what it reads goes to `outbound`; `inbound` writes to it."""

    def __init__(self, outbound: _Pipe, inbound: _Pipe, on_made: Any = None) -> None:
        self.outbound, self.inbound, self.on_made = outbound, inbound, on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=8 << 20)

        self.outbound.src = self.inbound.dst = transport
        if self.on_made is not None:
            self.on_made(transport)

    def data_received(self, data: bytes) -> None:
        self.outbound.feed(data)

    def eof_received(self) -> bool:
        self.outbound.feed(None)
        return True  # keep the socket open for the other direction

    def pause_writing(self) -> None:
        self.inbound.set_dst_full(True)

    def resume_writing(self) -> None:
        self.inbound.set_dst_full(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.outbound.feed(None)
        self.inbound.drop()


class _ProxiedConnection:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, target: tuple[str, int], delay: float, max_buffer: int
    ):
        self.loop, self.target = loop, target
        self.up = _Pipe(loop, delay, max_buffer, self._pipe_done)  # client -> target
        self.down = _Pipe(loop, delay, max_buffer, self._pipe_done)  # target -> client
        self.client = _End(self.up, self.down, on_made=self._client_made)
        self.server = _End(self.down, self.up)

    def _client_made(self, transport: asyncio.Transport) -> None:
        transport.pause_reading()
        self.loop.create_task(self._dial(transport))

    async def _dial(self, client: asyncio.Transport) -> None:
        try:
            await self.loop.create_connection(lambda: self.server, *self.target)
        except OSError:
            client.abort()
            return
        client.resume_reading()

    def _pipe_done(self) -> None:
        if self.up.done and self.down.done:
            for t in (self.up.src, self.down.src):
                if t is not None:
                    t.close()


async def serve_delay_proxy(
    listen: tuple[str, int], target: tuple[str, int], delay_ms: float, max_buffer: int = 64 << 20
) -> asyncio.Server:
    """Starts the proxy in this process's event loop (and network namespace)."""
    loop = asyncio.get_running_loop()
    delay = delay_ms / 1000.0
    return await loop.create_server(
        lambda: _ProxiedConnection(loop, target, delay, max_buffer).client, *listen, reuse_address=True
    )


# -- tools run inside the namespaces -------------------------------------------------------------


def _hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def _ready(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _listen(addr: str) -> socket.socket:
    srv = socket.create_server(_hostport(addr), reuse_port=False)
    _ready(port=srv.getsockname()[1])
    return srv


async def _proxy_main(args: argparse.Namespace) -> None:
    server = await serve_delay_proxy(
        _hostport(args.listen), _hostport(args.target), args.delay_ms, args.max_buffer
    )
    _ready(port=server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _sink(args: argparse.Namespace) -> None:
    """Accepts one connection and counts its bytes until EOF or --seconds; prints a JSON report."""
    srv = _listen(args.listen)
    conn, _ = srv.accept()
    conn.settimeout(args.seconds)
    buf = bytearray(_READ_CHUNK)
    total, first, last = 0, 0.0, 0.0
    deadline = time.monotonic() + args.seconds
    with contextlib.suppress(TimeoutError):
        while time.monotonic() < deadline:
            n = conn.recv_into(buf)
            if n == 0:
                break
            last = time.monotonic()
            if total == 0:
                first = last
            total += n
    conn.close()
    seconds = last - first
    print(
        json.dumps(
            {"bytes": total, "seconds": seconds, "mbit_s": total * 8 / 1e6 / seconds if seconds else 0.0}
        )
    )


def _source(args: argparse.Namespace) -> None:
    """Sends --bytes (or until --seconds pass) to --connect, then half-closes and waits for EOF."""
    sock = socket.create_connection(_hostport(args.connect), timeout=args.seconds)
    chunk = b"\x5a" * _READ_CHUNK
    sent, start = 0, time.monotonic()
    while sent < args.bytes and time.monotonic() - start < args.seconds:
        sent += sock.send(chunk[: min(len(chunk), args.bytes - sent)])
    sock.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass
    sock.close()
    print(json.dumps({"bytes": sent, "seconds": time.monotonic() - start}))


def _echo(args: argparse.Namespace) -> None:
    """Echoes one connection back to itself until EOF."""
    srv = _listen(args.listen)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.close()


def _ping(args: argparse.Namespace) -> None:
    """Round trips of a small message through --connect (an echo, maybe behind a proxy)."""
    sock = socket.create_connection(_hostport(args.connect), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"p" * args.size
    rtts = []
    for _ in range(args.count):
        t0 = time.monotonic()
        sock.sendall(msg)
        got = 0
        while got < len(msg):
            data = sock.recv(len(msg) - got)
            if not data:
                raise ConnectionError("echo closed the connection")
            got += len(data)
        rtts.append((time.monotonic() - t0) * 1e3)
    sock.close()
    rtts.sort()
    print(json.dumps({"min_ms": rtts[0], "median_ms": rtts[len(rtts) // 2], "max_ms": rtts[-1]}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="probes.py", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="tool", required=True)
    p = sub.add_parser("proxy", help="TCP forwarding proxy adding a one-way delay in each direction")
    p.add_argument("--listen", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--max-buffer", type=int, default=64 << 20)
    p = sub.add_parser("sink", help="receive one connection, report goodput")
    p.add_argument("--listen", required=True)
    p.add_argument("--seconds", type=float, default=30.0)
    p = sub.add_parser("source", help="send bytes to a sink")
    p.add_argument("--connect", required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--seconds", type=float, default=30.0)
    p = sub.add_parser("echo", help="echo one connection")
    p.add_argument("--listen", required=True)
    p = sub.add_parser("ping", help="measure round trips through an echo")
    p.add_argument("--connect", required=True)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    if args.tool == "proxy":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_proxy_main(args))
    else:
        {"sink": _sink, "source": _source, "echo": _echo, "ping": _ping}[args.tool](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
