"""Where the eval cluster's processes run and how they reach each other.

`NetnsTopology`: two emulated datacenters (tools/linkemu): the PrfaaS cluster in `<p>-prfaas`,
the local PD cluster (cache pool, router, PD-P, PD-D, the load driver) in `<p>-local`, a veth pair
shaped with tc tbf between them. Every service binds `0.0.0.0:PORT` (fixed ports: the namespaces
are fresh) and advertises `VIP_side:PORT`; the VIPs (10.203.1.1 for the PrfaaS side, .2 for the
local side) sit on `lo` in BOTH namespaces. Inside its own namespace a VIP is local, so intra-
datacenter traffic stays on loopback; in the other namespace a user-space delay proxy listens on
`VIP:PORT` and forwards over the shaped veth to the service. So the one advertised address is
right from either side, and every cross-datacenter byte (KV streams, prefill RPCs, heartbeats)
takes the tc-shaped link and the proxies' delay.

`LoopbackTopology`: every process on 127.0.0.1, ports picked by the kernel, no shaping (the form
that runs where network namespaces cannot be created).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VIPS = {"prfaas": "10.203.1.1", "local": "10.203.1.2"}
OTHER = {"prfaas": "local", "local": "prfaas"}


@dataclass(frozen=True)
class Endpoint:
    listen: str  # what the service binds
    advertise: str  # what others dial ("" = the bound address, learned when it listens)
    kv_port: int = 0  # the decode data port (0 = any)


class LoopbackTopology:
    name = "loopback"
    shaped = False

    def exec_prefix(self, side: str) -> list[str]:
        return []

    def endpoint(self, side: str, reach_from_other: bool = False, kv: bool = False) -> Endpoint:
        return Endpoint("127.0.0.1:0", "")

    def link_bytes(self) -> int | None:
        return None

    def set_rate(self, mbit: float) -> None:
        raise RuntimeError("the loopback form has no shaped link to change")

    def close(self) -> None:
        pass


class NetnsTopology:
    name = "netns"
    shaped = True

    def __init__(self, rate_mbit: float, delay_ms: float, prefix: str = "prfaas-eval") -> None:
        sys.path.insert(0, str(ROOT))  # tools/ is not installed with the package
        from tools.linkemu.netns import EmulatedLink, tbf_params

        self._tbf_params = tbf_params
        self.link = EmulatedLink(rate_mbit, delay_ms, prefix)
        self.rate_mbit = rate_mbit
        self.link.up()
        self._ports = itertools.count(21000)
        try:
            for side in ("prfaas", "local"):
                for vip in VIPS.values():
                    _run(["ip", "-n", self.link.namespace(side), "addr", "add", f"{vip}/32", "dev", "lo"])  # type: ignore[arg-type]
        except BaseException:
            self.link.down()
            raise

    def exec_prefix(self, side: str) -> list[str]:
        return self.link.exec_prefix(side)  # type: ignore[arg-type]

    def _proxy_into_other(self, side: str, port: int) -> None:
        """In the other namespace: VIP_side:port -> the service over the shaped veth."""
        from tools.linkemu.netns import read_ready_line

        other = OTHER[side]
        proc = self.link.run_tool(other, ["proxy", "--listen", f"{VIPS[side]}:{port}",  # type: ignore[arg-type]
                                   "--target", f"{self.link.address(side)}:{port}",  # type: ignore[arg-type]
                                   "--delay-ms", str(self.link.delay_ms),
                                   "--max-buffer", str(self.link.proxy_buffer_bytes)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        read_ready_line(proc, 10.0)

    def endpoint(self, side: str, reach_from_other: bool = False, kv: bool = False) -> Endpoint:
        port = next(self._ports)
        kv_port = next(self._ports) if kv else 0
        if reach_from_other:
            self._proxy_into_other(side, port)
            if kv_port:
                self._proxy_into_other(side, kv_port)
        return Endpoint(f"0.0.0.0:{port}", f"{VIPS[side]}:{port}", kv_port)

    def link_bytes(self) -> int | None:
        """Bytes received by the local side of the veth (PrfaaS -> local), cumulative."""
        out = _run(["ip", "-n", self.link.namespace("local"), "-s", "-j", "link", "show", "dev",
                    self.link.device("local")])
        return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])

    def set_rate(self, mbit: float) -> None:
        """Changes the PrfaaS -> local shaping now (`tc qdisc change`)."""
        burst, limit = self._tbf_params(mbit, self.link.mtu, self.link.queue_ms)
        _run(["tc", "-n", self.link.namespace("prfaas"), "qdisc", "change", "dev", self.link.device("prfaas"),
              "root", "tbf", "rate", f"{int(mbit * 1e6)}bit", "burst", str(burst), "limit", str(limit)])
        self.rate_mbit = mbit

    def close(self) -> None:
        self.link.down()


def _run(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {r.stderr.strip()}")
    return r.stdout


def make_topology(kind: str, rate_mbit: float, delay_ms: float) -> LoopbackTopology | NetnsTopology:
    """`netns`, `loopback`, or `auto` (netns where it can be built, else loopback)."""
    if kind == "loopback":
        return LoopbackTopology()
    sys.path.insert(0, str(ROOT))
    from tools.linkemu import link_supported

    ok, why = link_supported()
    if not ok:
        if kind == "netns":
            raise RuntimeError(f"cannot build the two-datacenter link here: {why}")
        return LoopbackTopology()
    return NetnsTopology(rate_mbit, delay_ms)
