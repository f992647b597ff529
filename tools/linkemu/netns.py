"""Cross-datacenter link emulation: two network namespaces, a shaped veth pair, a delay proxy.
An operations and test tool, not part of the serving library.

    <prefix>-prfaas  [veth-prfaas 10.203.0.1] ==tc tbf, both ways== [veth-local 10.203.0.2]  <prefix>-local

The kernel has no netem, so latency is added in user space: `start_delay_proxy` runs a TCP
forwarding proxy inside one namespace that holds each direction's bytes for `delay_ms` in a
timestamped queue before forwarding them, so a whole bandwidth-delay product stays in flight and
throughput is not limited by the delay. Needs root, `ip netns` and `tc`; `link_supported()` says
whether this machine has them.

The tools run inside the namespaces live in `probes.py` (run by file path, so that the child does
not import the package): `proxy`, and the measurement probes `sink`, `source`, `echo` and `ping`.
Both files import only the standard library.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

Side = Literal["prfaas", "local"]
SIDES: tuple[Side, Side] = ("prfaas", "local")
_OWNER_DIR = Path("/run/prfaas-linkemu")
PROBES = Path(__file__).resolve().parent / "probes.py"


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
        """Runs a tool of `probes.py` (`proxy`, `sink`, `source`, `echo`, `ping`) inside `side`."""
        return self.run_in(side, [sys.executable, str(PROBES), *tool_args], **popen_kwargs)

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
