"""Emulated cross-datacenter link from the command line (needs root).

    python -m tools.linkemu measure --rate-mbit 200 --delay-ms 5     # goodput and RTT, as JSON
    python -m tools.linkemu up --rate-mbit 200 --delay-ms 5 \\
        --proxy 50061:10.203.0.2:50061                          # hold the link until Ctrl-C

While `up` runs, start processes with `ip netns exec <prefix>-prfaas ...` / `<prefix>-local`.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys

from tools.linkemu import EmulatedLink, link_supported, read_ready_line


def _measure(link: EmulatedLink, seconds: float) -> dict[str, float]:
    local = link.address("local")
    result: dict[str, float] = {"rate_mbit": link.rate_mbit, "delay_ms": link.delay_ms}
    for name, via_proxy in (("direct", False), ("proxied", True)):
        sink = link.run_tool(
            "local",
            ["sink", "--listen", "0.0.0.0:0", "--seconds", str(4 * seconds + 5)],
            stdout=subprocess.PIPE,
            text=True,
        )
        port = read_ready_line(sink, 10)["port"]
        target = link.start_delay_proxy("prfaas", 0, local, port) if via_proxy else f"{local}:{port}"
        nbytes = int(link.rate_mbit * 1e6 / 8 * seconds) if link.rate_mbit > 0 else 1 << 40
        link.run_tool(
            "prfaas",
            ["source", "--connect", target, "--bytes", str(nbytes), "--seconds", str(seconds)],
            stdout=subprocess.DEVNULL,
        ).wait()
        result[f"{name}_goodput_mbit"] = json.loads(sink.communicate()[0])["mbit_s"]
    echo = link.run_tool("local", ["echo", "--listen", "0.0.0.0:0"], stdout=subprocess.PIPE, text=True)
    via = link.start_delay_proxy("prfaas", 0, local, read_ready_line(echo, 10)["port"])
    ping = link.run_tool(
        "prfaas", ["ping", "--connect", via, "--count", "20"], stdout=subprocess.PIPE, text=True
    )
    result.update({f"rtt_{k}": v for k, v in json.loads(ping.communicate()[0]).items()})
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["measure", "up"])
    ap.add_argument("--rate-mbit", type=float, default=200.0, help="<= 0: unshaped")
    ap.add_argument("--delay-ms", type=float, default=5.0, help="one-way delay added by each proxy")
    ap.add_argument("--prefix", default="prfaas-link")
    ap.add_argument("--mtu", type=int, default=9000)
    ap.add_argument("--seconds", type=float, default=3.0, help="measure: length of each goodput run")
    ap.add_argument(
        "--proxy",
        action="append",
        default=[],
        metavar="LISTEN_PORT:HOST:PORT",
        help="up: a delay proxy in the prfaas namespace (repeatable)",
    )
    args = ap.parse_args()
    ok, why = link_supported()
    if not ok:
        print(f"error: {why}", file=sys.stderr)
        return 2
    with EmulatedLink(args.rate_mbit, args.delay_ms, name_prefix=args.prefix, mtu=args.mtu) as link:
        if args.command == "measure":
            print(json.dumps(_measure(link, args.seconds)))
            return 0
        proxies = []
        for spec in args.proxy:
            listen, host, port = spec.split(":")
            proxies.append(link.start_delay_proxy("prfaas", int(listen), host, int(port)))
        print(
            json.dumps(
                {
                    "prfaas": [link.namespace("prfaas"), link.address("prfaas")],
                    "local": [link.namespace("local"), link.address("local")],
                    "proxies": proxies,
                }
            ),
            flush=True,
        )
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
