"""Cross-datacenter link emulation: two network namespaces, a shaped veth pair, a delay proxy.

    <prefix>-prfaas  [veth-prfaas 10.203.0.1] ==tc tbf, both ways== [veth-local 10.203.0.2]  <prefix>-local

The kernel has no netem, so latency is added in user space: `start_delay_proxy` runs a TCP
forwarding proxy inside one namespace that holds each direction's bytes for `delay_ms` in a
timestamped queue before forwarding them, so a whole bandwidth-delay product stays in flight and
throughput is not limited by the delay. Needs root, `ip netns` and `tc`; `link_supported()` says
whether this machine has them.

The module doubles as a small tool run inside the namespaces (by file path, so that the child does
not import the package): `proxy`, and the measurement probes `sink`, `source`, `echo` and `ping`.
This file imports only the standard library.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

Side = Literal["prfaas", "local"]
SIDES: tuple[Side, Side] = ("prfaas", "local")
_OWNER_DIR = Path("/run/prfaas-linkemu")
_READ_CHUNK = 1 << 20


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _netns_list() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


_supported: tuple[bool, str] | None = None


def link_supported() -> tuple[bool, str]:
    """(True, "") when this process can build an EmulatedLink, else (False, why not). Cached."""
    global _supported
    if _supported is None:
        _supported = _probe_support()
    return _supported


def _probe_support() -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    ns = f"prfaas-probe-{os.getpid()}"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "-n", ns, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"],
        [
            "tc",
            "-n",
            ns,
            "qdisc",
            "add",
            "dev",
            "probe0",
            "root",
            "tbf",
            "rate",
            "1mbit",
            "burst",
            "32768",
            "limit",
            "65536",
        ],
    ]
    try:
        for argv in steps:
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode != 0:
                return False, f"`{' '.join(argv)}` failed: {r.stderr.strip()}"
        return True, ""
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def tbf_params(rate_mbit: float, mtu: int, queue_ms: float) -> tuple[int, int]:
    """(burst, limit) in bytes for a tbf shaping at `rate_mbit`: the bucket holds about a
    millisecond at the rate (never less than a few frames, so GSO packets pass without being split
    too finely) and the queue `queue_ms` of traffic, enough for TCP to keep the link busy."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(4 * mtu, 32 * 1024, int(rate_bytes * 1e-3))
    limit = burst + max(4 * mtu, int(rate_bytes * queue_ms * 1e-3))
    return burst, limit


def cleanup_stale(name_prefix: str) -> list[str]:
    """Deletes namespaces `<name_prefix>-*` left behind by a process that died without tearing
    its link down. Raises RuntimeError when a live process other than this one owns them."""
    owner = _owner_pid(name_prefix)
    stale = [ns for ns in _netns_list() if ns.startswith(f"{name_prefix}-")]
    if stale and owner is not None and owner != os.getpid() and _pid_alive(owner):
        raise RuntimeError(f"namespaces {stale} belong to a live link of pid {owner}")
    for ns in stale:
        _ip("netns", "del", ns, check=False)
    (_OWNER_DIR / f"{name_prefix}.pid").unlink(missing_ok=True)
    return stale


def _owner_pid(name_prefix: str) -> int | None:
    try:
        return int((_OWNER_DIR / f"{name_prefix}.pid").read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmulatedLink:
    """Two namespaces, `<prefix>-prfaas` (10.203.0.1) and `<prefix>-local` (10.203.0.2), joined by
    a veth pair shaped to `rate_mbit` in each direction (rate_mbit <= 0: unshaped).

    Use as `with EmulatedLink(...) as link:` or `async with`. Teardown (also after errors) stops
    every process started through the link and deletes both namespaces, which removes the veth
    pair and its qdiscs; namespaces of a dead earlier owner with the same prefix are removed first.
    `delay_ms` is the one-way delay the proxies add (a round trip through a proxy takes 2x)."""

    def __init__(
        self,
        rate_mbit: float,
        delay_ms: float = 0.0,
        name_prefix: str = "prfaas-link",
        *,
        subnet: str = "10.203.0",
        mtu: int = 9000,
        queue_ms: float = 10.0,
        proxy_buffer_bytes: int = 64 << 20,
    ) -> None:
        self.rate_mbit = rate_mbit
        self.delay_ms = delay_ms
        self.name_prefix = name_prefix
        self.mtu = mtu
        self.queue_ms = queue_ms
        self.proxy_buffer_bytes = proxy_buffer_bytes
        self._addresses = {"prfaas": f"{subnet}.1", "local": f"{subnet}.2"}
        self._procs: list[subprocess.Popen[Any]] = []
        self._is_up = False

    def namespace(self, side: Side) -> str:
        return f"{self.name_prefix}-{side}"

    def address(self, side: Side) -> str:
        return self._addresses[side]

    def device(self, side: Side) -> str:
        return f"veth-{side}"

    def exec_prefix(self, side: Side) -> list[str]:
        """argv prefix that runs a command inside `side` (for asyncio.create_subprocess_exec)."""
        return ["ip", "netns", "exec", self.namespace(side)]

    # -- lifecycle ---------------------------------------------------------------------------

    def up(self) -> EmulatedLink:
        ok, why = link_supported()
        if not ok:
            raise RuntimeError(f"cannot emulate a link here: {why}")
        cleanup_stale(self.name_prefix)
        _OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (_OWNER_DIR / f"{self.name_prefix}.pid").write_text(str(os.getpid()))
        self._is_up = True
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        p, loc = self.namespace("prfaas"), self.namespace("local")
        _ip("netns", "add", p)
        _ip("netns", "add", loc)
        _ip(
            "link",
            "add",
            self.device("prfaas"),
            "netns",
            p,
            "type",
            "veth",
            "peer",
            "name",
            self.device("local"),
            "netns",
            loc,
        )
        for side in SIDES:
            ns, dev = self.namespace(side), self.device(side)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(side)}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "mtu", str(self.mtu), "up")
            if self.rate_mbit > 0:
                burst, limit = tbf_params(self.rate_mbit, self.mtu, self.queue_ms)
                subprocess.run(
                    [
                        "tc",
                        "-n",
                        ns,
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        f"{int(self.rate_mbit * 1e6)}bit",
                        "burst",
                        str(burst),
                        "limit",
                        str(limit),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )

    def down(self) -> None:
        """Stops the link's processes and deletes its namespaces. Safe to call twice."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs.clear()
        if self._is_up:
            cleanup_stale(self.name_prefix)
            self._is_up = False

    def __enter__(self) -> EmulatedLink:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    async def __aenter__(self) -> EmulatedLink:
        return await asyncio.to_thread(self.up)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.down)

    # -- processes inside the namespaces -----------------------------------------------------

    def run_in(self, side: Side, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Starts `argv` inside `side`'s namespace; the link stops it on teardown."""
        proc = subprocess.Popen([*self.exec_prefix(side), *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def run_tool(self, side: Side, tool_args: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Runs this module's own tool (`proxy`, `sink`, `source`, `echo`, `ping`) inside `side`."""
        return self.run_in(side, [sys.executable, os.path.abspath(__file__), *tool_args], **popen_kwargs)

    def start_delay_proxy(
        self,
        listen_side: Side,
        listen_port: int,
        target_host: str,
        target_port: int,
        *,
        delay_ms: float | None = None,
        timeout_s: float = 10.0,
    ) -> str:
        """Starts a delay proxy listening on `listen_port` (0: any free port) in `listen_side`,
        forwarding to target_host:target_port; returns the "host:port" that processes in
        `listen_side` dial (127.0.0.1 works there too)."""
        delay = self.delay_ms if delay_ms is None else delay_ms
        proc = self.run_tool(
            listen_side,
            [
                "proxy",
                "--listen",
                f"0.0.0.0:{listen_port}",
                "--target",
                f"{target_host}:{target_port}",
                "--delay-ms",
                str(delay),
                "--max-buffer",
                str(self.proxy_buffer_bytes),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = read_ready_line(proc, timeout_s)
        return f"{self.address(listen_side)}:{ready['port']}"


def read_ready_line(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    """Waits for a tool's first stdout line (a JSON object, printed once it listens)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            proc.kill()
            raise TimeoutError(f"{proc.args!r} did not report ready within {timeout_s}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{proc.args!r} exited with {proc.wait()} before it was ready")
    return dict(json.loads(line))


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
                self.dst.write_eof()
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
    ap = argparse.ArgumentParser(prog="linkemu", description=__doc__.splitlines()[0] if __doc__ else None)
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
