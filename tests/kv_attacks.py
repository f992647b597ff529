"""Hostile peers of the raw-TCP KV data plane (issue 10), as a separate attacker process, and
the measurements around them: the decode node's RSS and another stream's token gaps.

    python -m tests.kv_attacks --attack frame_length --target 127.0.0.1:PORT --seconds 5

Attacks (each from `--source`, a loopback address other than the cluster's):
  frame_length  8 connections each declaring a 256 MiB frame and sending zeros as fast as they can
                (reconnecting when refused); then the same with 60 MiB, under the frame cap
  big_frame     one 200 MiB frame of `shape` fields (a parser bomb), repeated
  conn_flood    3000 connections opened and held idle
  slowloris     200 connections, each trickling one byte of a frame per second
The attacker prints one JSON line: what the node answered (verdict codes, refusals, closes).
Used by tests/test_kv_attacks.py and bench/kv_attacks.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

LEN = struct.Struct("<I")
CODES = {1: "CANCELLED", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND", 6: "ALREADY_EXISTS",
         8: "RESOURCE_EXHAUSTED", 13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS"}
ATTACKS = ("frame_length", "big_frame", "conn_flood", "slowloris")


# --- the attacker (its own process) ------------------------------------------------------------------
class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()

    def add(self, what: str) -> None:
        with self.lock:
            self.seen[what] += 1


def _connect(target: tuple[str, int], source: str) -> socket.socket:
    s = socket.create_connection(target, timeout=5, source_address=(source, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # no TIME_WAIT pile-up
    return s


def _verdict_of(s: socket.socket, tally: Tally) -> None:
    try:
        s.settimeout(2)
        head = s.recv(4)
        if len(head) < 4:
            return tally.add("closed")
        body = s.recv(LEN.unpack(head)[0])
        tally.add(CODES.get(body[1], str(body[1])) if body[:1] == b"E" else "K")
    except OSError:
        tally.add("reset")


def _flood_frame(target: tuple[str, int], source: str, declared: int, stop: float, tally: Tally, body: bytes,
                 repeat: bool = True) -> None:
    first = True
    while time.monotonic() < stop and (repeat or first):
        first = False
        try:
            s = _connect(target, source)
        except OSError:
            tally.add("connect_failed")
            time.sleep(0.05)
            continue
        try:
            s.sendall(LEN.pack(declared))
            sent = 0
            while sent < declared and time.monotonic() < stop:
                sent += s.send(body[: min(len(body), declared - sent)])
            tally.add("frame_sent" if sent >= declared else "frame_cut")
        except OSError:
            pass
        _verdict_of(s, tally)
        s.close()
        time.sleep(0.01)


def attack(kind: str, target: tuple[str, int], seconds: float, source: str) -> dict[str, int]:
    tally, stop = Tally(), time.monotonic() + seconds
    threads: list[threading.Thread] = []
    if kind == "frame_length":
        zeros = bytes(1 << 20)
        for i in range(8):
            declared = (256 << 20) if i % 2 == 0 else (60 << 20)
            threads.append(threading.Thread(target=_flood_frame, args=(target, source, declared, stop, tally, zeros)))
    elif kind == "big_frame":
        bomb = b"\x48\x01" * (1 << 19)  # field 9 (shape), varint 1: a 200 MiB frame of them
        once = (target, source, 200 << 20, stop, tally, bomb, False)
        threads.append(threading.Thread(target=_flood_frame, args=once))
    elif kind == "conn_flood":
        threads.append(threading.Thread(target=_hold, args=(target, source, 3000, stop, tally, False)))
    elif kind == "slowloris":
        threads.append(threading.Thread(target=_hold, args=(target, source, 200, stop, tally, True)))
    else:
        raise ValueError(f"unknown attack {kind!r}; choose from {', '.join(ATTACKS)}")
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(tally.seen)


def _hold(target: tuple[str, int], source: str, n: int, stop: float, tally: Tally, trickle: bool) -> None:
    socks: list[socket.socket] = []
    for _ in range(n):
        if time.monotonic() > stop + 20:  # a node that accepts nothing any more
            tally.add("not_opened")
            continue
        try:
            s = _connect(target, source)
            s.setblocking(False)
            if trickle:
                s.send(LEN.pack(1000))
            socks.append(s)
            tally.add("opened")
        except OSError:
            tally.add("connect_failed")
    stop = max(stop, time.monotonic() + 5)  # long enough past the last connect for the node's timeouts
    while time.monotonic() < stop and socks:
        for s in list(socks):
            try:
                if trickle:
                    s.send(b"\x00")
                got = s.recv(4096)
                tally.add("answered" if got else "closed_by_node")
                socks.remove(s)
                s.close()
            except BlockingIOError:
                pass
            except OSError:
                tally.add("reset")
                socks.remove(s)
                s.close()
        time.sleep(1.0 if trickle else 0.2)
    with tally.lock:
        tally.seen["still_open"] += len(socks)
    for s in socks:
        s.close()


# --- the measurements (the test's or the bench's process) -------------------------------------------
def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def kv_port_of(log_path: Path, timeout_s: float = 60.0) -> tuple[str, int]:
    """The decode node's raw-TCP data port, from its `kv_data_port` log line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_path.exists():
            m = re.search(r'tcp://([\d.]+):(\d+)', log_path.read_text())
            if m:
                return m.group(1), int(m.group(2))
        time.sleep(0.2)
    raise TimeoutError(f"no kv_data_port line in {log_path}")


@dataclass
class Run:
    attack: str
    code: str = ""
    tokens: list[int] = field(default_factory=list)
    max_gap_s: float = 0.0
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    fds_before: int = 0
    fds_peak: int = 0  # the decode process's open file descriptors (its connections among them)
    answers: dict[str, int] = field(default_factory=dict)


async def timed_stream(router: str, prompt: list[int], max_tokens: int) -> tuple[str, list[int], float]:
    """One Generate call: its status, tokens and the longest gap between token messages."""
    import grpc

    from prfaas.rpc import channel
    from prfaas.security.tls import TlsConfig  # the attacked cluster runs --insecure: the attacks reach the parser
    from prfaas.v1 import router_pb2, router_pb2_grpc

    tokens: list[int] = []
    gaps, last = [0.0], None
    async with channel(router, expect="router", tls=TlsConfig(insecure=True)) as ch:
        req = router_pb2.GenerateRequest(token_ids=prompt, max_tokens=max_tokens, ignore_eos=True)
        try:
            async for msg in router_pb2_grpc.RouterStub(ch).Generate(req, timeout=120):
                now = time.monotonic()
                if last is not None and msg.token_ids:
                    gaps.append(now - last)
                last = now
                tokens += list(msg.token_ids)
        except grpc.aio.AioRpcError as e:
            return e.code().name, tokens, max(gaps)
    return "OK", tokens, max(gaps)


def measure(router: str, decode_pid: int, target: tuple[str, int], kind: str, prompt: list[int],
            max_tokens: int = 48, seconds: float = 6.0, source: str = "127.0.0.2") -> Run:
    """Runs attack `kind` (none when empty) from a separate process while a request streams;
    samples the decode node's RSS meanwhile."""
    run = Run(kind or "none", rss_before_mib=rss_mib(decode_pid), fds_before=fds_of(decode_pid))
    proc = None
    if kind:
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(root)}
        proc = subprocess.Popen([sys.executable, "-m", "tests.kv_attacks", "--attack", kind, "--source", source,
                                 "--target", f"{target[0]}:{target[1]}", "--seconds", str(seconds)],
                                cwd=root, env=env, stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(10))
        time.sleep(min(2.0, seconds / 3))  # the attack is under way when the request starts
    peak, fds, done = [run.rss_before_mib], [run.fds_before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(rss_mib(decode_pid))
            fds.append(fds_of(decode_pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run.code, run.tokens, run.max_gap_s = asyncio.run(timed_stream(router, prompt, max_tokens))
        if proc is not None:
            try:
                out, _ = proc.communicate(timeout=seconds + 60)
                run.answers = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            except subprocess.TimeoutExpired:
                run.answers = {"attacker_timed_out": 1}
    finally:
        done.set()
        sampler.join()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    run.rss_peak_mib, run.fds_peak = max(peak), max(fds)
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attack", required=True, choices=ATTACKS)
    p.add_argument("--target", required=True, help="HOST:PORT of the decode node's KV data port")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--source", default="127.0.0.2", help="the loopback address to attack from")
    a = p.parse_args(argv)
    host, _, port = a.target.rpartition(":")
    print(json.dumps(attack(a.attack, (host, int(port)), a.seconds, a.source)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
