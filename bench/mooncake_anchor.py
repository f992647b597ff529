"""Mooncake's Transfer Engine over TCP as an anchor beside the KV benches (ANCHORS.md).

SGLang and vLLM move PD-disaggregation KV with Mooncake's engine; here it moves the same number of
bytes as the bench's transfer between two processes, so a bench's table shows where the KvSender
stands against it in the same run:

    from mooncake_anchor import loopback_gbps          # bench/ is on sys.path in the benches
    rates = loopback_gbps(nbytes)                      # {mode: bytes/s}, or None (reason printed)

Modes (each moves `nbytes` in `block_bytes` blocks from a registered source buffer into a
registered buffer of the receiver, which checks a CRC-32 of what arrived, then zeroes it):
- "submit + poll": every block submitted with `transfer_submit_write`, then polled with
  `transfer_check_status` (100 us apart) until all are done, the engine's threads moving them;
- "batch sync": one `batch_transfer_sync_write` of all blocks (the form vLLM's connector uses);
- "sync": `transfer_sync_write` block by block.

The package (`pip install mooncake-transfer-engine-non-cuda`, plus Debian's `libibverbs1`) need not
be in the bench's own interpreter: the endpoints are child processes running this file (standard
library and `mooncake.engine` only) with `PRFAAS_MOONCAKE_PYTHON` (default: this interpreter).

Where it listens: whatever host `initialize` is given, Mooncake's TCP transport binds its data port
on `[::]` (all addresses, dual stack) and its P2P handshake port on 0.0.0.0; `MC_TCP_BIND_ADDRESS`
changes the address it logs, not the bind. Neither port authenticates its peer. So on loopback the
pair runs inside a private network namespace that has only `lo` (root and `ip netns`); without one
it runs on the host's loopback and says that it listened on every address meanwhile.

    python bench/mooncake_anchor.py [--bytes 94371840] [--block-kib 4096] [--reps 3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from typing import IO, Any

PYTHON_ENV = "PRFAAS_MOONCAKE_PYTHON"
MODES = ("submit + poll", "batch sync", "sync")
POLL_S = 100e-6
Start = Callable[[list[str]], "subprocess.Popen[str]"]


def cpu_s() -> float:
    """User + system seconds of this process, all its threads (the engine's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def mooncake_python() -> str:
    return os.environ.get(PYTHON_ENV) or sys.executable


def unavailable(python: str | None = None) -> str | None:
    """Why the anchor cannot run with `python` (None: it can)."""
    python = python or mooncake_python()
    try:
        out = subprocess.run(
            [python, "-c", "from mooncake.engine import TransferEngine; TransferEngine()"],
            capture_output=True, text=True, timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {python}: {e!r}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return (f"`mooncake.engine` does not import in {python} ({last}); pip install "
                f"mooncake-transfer-engine-non-cuda, apt-get install libibverbs1, or set {PYTHON_ENV}")
    return None


# --- the endpoints (child processes) -------------------------------------------------------------
def _engine(host: str) -> Any:
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    if engine.initialize(host, "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError(f"TransferEngine.initialize({host!r}, P2PHANDSHAKE, tcp) failed")
    return engine


def _registered(engine: Any, nbytes: int) -> Any:
    buf = ctypes.create_string_buffer(nbytes)
    if engine.register_memory(ctypes.addressof(buf), nbytes) != 0:
        raise RuntimeError(f"register_memory of {nbytes} bytes failed")
    return buf


def listening_sockets() -> list[str]:
    """"addr:port" of every TCP socket this process listens on (from /proc, by socket inode)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, wildcard in (("/proc/self/net/tcp", "0" * 8), ("/proc/self/net/tcp6", "0" * 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # state LISTEN
                hexaddr, hexport = f[1].split(":")
                addr = ("[::]" if len(hexaddr) == 32 else "0.0.0.0") if hexaddr == wildcard else _addr(hexaddr)
                out.append(f"{addr}:{int(hexport, 16)}")
    return sorted(out)


def _addr(hexaddr: str) -> str:
    if len(hexaddr) == 8:
        return ".".join(str(b) for b in bytes.fromhex(hexaddr)[::-1])
    return f"[{hexaddr}]"  # a specific IPv6 address, raw (only the wildcard matters here)


def receive(host: str, nbytes: int) -> None:
    """Registers `nbytes`, prints one READY JSON line, then answers stdin: `check` prints the CRC-32
    of the buffer (and zeroes it), `quit` (or end of input) exits."""
    engine = _engine(host)
    buf = _registered(engine, nbytes)
    rpc = engine.get_rpc_port()
    ports = listening_sockets()
    data = [p for p in ports if not p.endswith(f":{rpc}")]
    print(json.dumps({"rpc_port": rpc, "addr": ctypes.addressof(buf), "listening": ports,
                      "data_ports": sorted({int(p.rsplit(":", 1)[1]) for p in data})}), flush=True)
    c0 = cpu_s()
    for line in sys.stdin:
        if line.strip() != "check":
            break
        cpu, c0 = cpu_s() - c0, cpu_s()  # the engine's threads while receiving (this check excluded)
        crc = zlib.crc32(memoryview(buf).cast("B")[:nbytes])
        ctypes.memset(buf, 0, nbytes)
        print(json.dumps({"crc": crc, "cpu_s": cpu}), flush=True)
        c0 = cpu_s()


def _fill(buf: Any, nbytes: int) -> int:
    pattern = os.urandom(1 << 20)
    view = memoryview(buf).cast("B")
    for off in range(0, nbytes, len(pattern)):
        n = min(len(pattern), nbytes - off)
        view[off : off + n] = pattern[:n]
    return zlib.crc32(view[:nbytes])


def _blocks(src: int, dst: int, nbytes: int, block: int) -> list[tuple[int, int, int]]:
    return [(src + off, dst + off, min(block, nbytes - off)) for off in range(0, nbytes, block)]


def _run_mode(engine: Any, mode: str, target: str, blocks: list[tuple[int, int, int]]) -> None:
    if mode == "submit + poll":
        ids = [engine.transfer_submit_write(target, s, d, n) for s, d, n in blocks]
        for i in ids:
            while (status := engine.transfer_check_status(i)) == 0:
                time.sleep(POLL_S)  # yield the core to the engine's threads (a bare spin halves it here)
            if status < 0:
                raise RuntimeError(f"transfer_check_status: {status}")
    elif mode == "batch sync":
        srcs, dsts, lens = (list(x) for x in zip(*blocks, strict=True))
        if (rc := engine.batch_transfer_sync_write(target, srcs, dsts, lens)) != 0:
            raise RuntimeError(f"batch_transfer_sync_write: {rc}")
    else:
        for s, d, n in blocks:
            if (rc := engine.transfer_sync_write(target, s, d, n)) != 0:
                raise RuntimeError(f"transfer_sync_write: {rc}")


def send(host: str, target: str, raddr: int, nbytes: int, block: int, reps: int, modes: Sequence[str]) -> None:
    """Prints one JSON line per timed run: mode, seconds and the source's CRC-32 (the receiver is
    asked for its own after each run); the first run of each mode warms the connections."""
    engine = _engine(host)
    buf = _registered(engine, nbytes)
    crc = _fill(buf, nbytes)
    blocks = _blocks(ctypes.addressof(buf), raddr, nbytes, block)
    for mode in modes:
        for rep in range(reps + 1):
            t0, c0 = time.perf_counter(), cpu_s()
            _run_mode(engine, mode, target, blocks)
            secs, cpu = time.perf_counter() - t0, cpu_s() - c0
            print(json.dumps({"mode": mode, "rep": rep, "seconds": secs, "crc": crc, "cpu_s": cpu}), flush=True)
            sys.stdin.readline()  # the driver checks the receiver's copy before the next run


# --- driving a pair --------------------------------------------------------------------------------
def endpoint_argv(python: str, *args: str) -> list[str]:
    return [python, os.path.abspath(__file__), *args]


def _json_line(stream: IO[str] | None, what: str) -> dict[str, Any]:
    assert stream is not None
    line = stream.readline()
    if not line:
        raise RuntimeError(f"the Mooncake {what} exited without answering")
    return dict(json.loads(line))


def run_pair(
    start_receiver: Start,
    start_sender: Start,
    *,
    receiver_host: str,
    sender_host: str,
    nbytes: int,
    block_bytes: int = 4 << 20,
    reps: int = 3,
    modes: Sequence[str] = MODES,
    python: str | None = None,
    before_send: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, list[float]]:
    """Starts a receiver and a sender through the callables (each Popens an argv where it should
    run: a namespace, the host) and returns {mode: bytes/s of each timed run}; every run's bytes
    are checked by CRC-32. `before_send(ready)` may start proxies and return the target "host:port"
    (default: receiver_host and its handshake port)."""
    python = python or mooncake_python()
    recv = start_receiver(endpoint_argv(python, "--receive", "--host", receiver_host, "--bytes", str(nbytes)))
    procs = [recv]
    try:
        ready = _json_line(recv.stdout, "receiver")
        target = before_send(ready) if before_send else f"{receiver_host}:{ready['rpc_port']}"
        argv = ["--send", target, "--host", sender_host, "--addr", str(ready["addr"]), "--bytes", str(nbytes),
                "--block", str(block_bytes), "--reps", str(reps), "--modes", *modes]
        sender = start_sender(endpoint_argv(python, *argv))
        procs.append(sender)
        assert recv.stdin is not None and sender.stdin is not None
        rates: dict[str, list[float]] = {}
        cpu: dict[str, list[tuple[float, float]]] = {}
        for _ in range(len(modes) * (reps + 1)):
            run = _json_line(sender.stdout, "sender")
            recv.stdin.write("check\n")
            recv.stdin.flush()
            check = _json_line(recv.stdout, "receiver")
            if check["crc"] != run["crc"]:
                raise RuntimeError(f"Mooncake {run['mode']}: CRC {check['crc']:#x} arrived, {run['crc']:#x} sent")
            sender.stdin.write("next\n")
            sender.stdin.flush()
            if run["rep"]:
                rates.setdefault(run["mode"], []).append(nbytes / run["seconds"])
                cpu.setdefault(run["mode"], []).append((run["cpu_s"], check["cpu_s"]))
        for mode, pairs in cpu.items():  # CPU per GB moves less than GB/s on a loaded machine
            snd, rcv = (sorted(x)[len(x) // 2] / (nbytes / 1e9) for x in zip(*pairs, strict=True))
            print(f"[mooncake] {mode}: best {max(rates[mode]) / 1e9:.2f} GB/s; CPU s/GB send + recv {snd:.2f} + "
                  f"{rcv:.2f}", file=sys.stderr, flush=True)
        return rates
    except RuntimeError as e:
        raise RuntimeError(f"{e}; {_stderr_tail(procs)}") from e
    finally:
        for p in procs:
            p.kill()
            p.wait()


class PrivateLoopback:
    """A network namespace with only `lo` up, so that Mooncake's wildcard listeners are reachable
    from nothing but each other. `start(argv)` runs a command inside it."""

    def __init__(self) -> None:
        self.name = f"prfaas-mooncake-{os.getpid()}"

    @staticmethod
    def unavailable() -> str | None:
        if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("ip") is None:
            return "a private network namespace needs Linux, root and `ip`"
        return None

    def __enter__(self) -> PrivateLoopback:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, capture_output=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def start(self, argv: list[str]) -> subprocess.Popen[str]:
        return _popen(["ip", "netns", "exec", self.name, *argv])


def _popen(argv: list[str]) -> subprocess.Popen[str]:
    """Popen with pipes for the protocol; stderr (Mooncake's log) goes to a temporary file."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log_file = log  # type: ignore[attr-defined]
    return proc


def _stderr_tail(procs: Sequence[subprocess.Popen[str]]) -> str:
    """The last error lines the endpoints logged (glog: lines starting E or F)."""
    lines: list[str] = []
    for p in procs:
        log = getattr(p, "log_file", None)
        if log is None:
            continue
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
        lines += [ln for ln in text.splitlines() if ln[:1] in "EF" or "Error" in ln][-3:]
    return "endpoint log: " + (" | ".join(lines) or "no errors logged")


def loopback_gbps(
    nbytes: int, *, block_bytes: int = 4 << 20, reps: int = 3, modes: Sequence[str] = MODES,
    python: str | None = None,
) -> dict[str, float] | None:
    """{mode: bytes/s, best of `reps`} for `nbytes` moved on loopback between two processes, or
    None (with the reason printed) where the package is missing or the run fails."""
    python = python or mooncake_python()
    if (why := unavailable(python)) is not None:
        print(f"[mooncake] skipped: {why}", file=sys.stderr, flush=True)
        return None
    kw = dict(receiver_host="127.0.0.1", sender_host="127.0.0.1", nbytes=nbytes, block_bytes=block_bytes,
              reps=reps, modes=modes, python=python)
    try:
        if (why := PrivateLoopback.unavailable()) is None:
            with PrivateLoopback() as ns:
                runs = run_pair(ns.start, ns.start, **kw)  # type: ignore[arg-type]
        else:
            print(f"[mooncake] on the host's loopback ({why}): it listens on all addresses meanwhile",
                  file=sys.stderr, flush=True)
            runs = run_pair(_popen, _popen, **kw)  # type: ignore[arg-type]
        return {mode: max(r) for mode, r in runs.items()}
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"[mooncake] failed: {e}", file=sys.stderr, flush=True)
        return None


def link_gbps(
    link: Any, nbytes: int, *, delayed: bool, block_bytes: int = 4 << 20, reps: int = 3,
    modes: Sequence[str] = MODES[:2], python: str | None = None,
) -> dict[str, list[float]] | None:
    """{mode: bytes/s of each timed run} across an `EmulatedLink` (prfaas/transport/linkemu.py): the receiver in its
    "local" namespace, the sender in "prfaas"; None (reason printed) where it cannot run.

    `delayed`: through the link's user-space delay proxies. Mooncake dials two ports (the P2P
    handshake port, then the data port the handshake names), both at the host of the segment name
    the receiver gave `initialize`, so the receiver calls itself by the prfaas side's address and a
    proxy listens there on each of its port numbers, forwarding to the same port across the link."""
    python = python or mooncake_python()
    if (why := unavailable(python)) is not None:
        print(f"[mooncake] skipped: {why}", file=sys.stderr, flush=True)
        return None
    near, far = link.address("prfaas"), link.address("local")

    def start(side: str) -> Start:
        return lambda argv: _popen_in(link, side, argv)

    def proxies(ready: dict[str, Any]) -> str:
        for port in [ready["rpc_port"], *ready["data_ports"]]:
            link.start_delay_proxy("prfaas", port, far, port)
        return f"{near}:{ready['rpc_port']}"

    try:
        return run_pair(start("local"), start("prfaas"), receiver_host=near if delayed else far, sender_host=near,
                        nbytes=nbytes, block_bytes=block_bytes, reps=reps, modes=modes, python=python,
                        before_send=proxies if delayed else None)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"[mooncake] failed across the link: {e}", file=sys.stderr, flush=True)
        return None


def _popen_in(link: Any, side: str, argv: list[str]) -> subprocess.Popen[str]:
    log = tempfile.TemporaryFile()
    proc = link.run_in(side, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log_file = log
    return proc  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--bytes", type=int, default=90 << 20)
    ap.add_argument("--block", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--block-kib", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--receive", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--send", help=argparse.SUPPRESS)
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--addr", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    block = a.block or a.block_kib << 10
    if a.receive:
        receive(a.host, a.bytes)
    elif a.send:
        send(a.host, a.send, a.addr, a.bytes, block, a.reps, a.modes)
    else:
        rates = loopback_gbps(a.bytes, block_bytes=block, reps=a.reps, modes=a.modes)
        for mode, rate in (rates or {}).items():
            print(f"Mooncake TE over TCP, {mode}, {block >> 10} KiB blocks: {rate / 1e9:.2f} GB/s")
        sys.exit(0 if rates is not None else 1)


if __name__ == "__main__":
    main()
