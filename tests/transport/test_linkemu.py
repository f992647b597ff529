"""The emulated cross-datacenter link: shaped veth between two namespaces, and the delay proxy."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import pytest

from tools.linkemu import (
    EmulatedLink,
    Side,
    link_supported,
    read_ready_line,
    serve_delay_proxy,
    tbf_params,
)

RATE_MBIT = 200.0
DELAY_MS = 5.0
SUPPORTED, WHY_NOT = link_supported()
needs_netns = pytest.mark.skipif(not SUPPORTED, reason=f"no network namespaces here: {WHY_NOT}")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _goodput_mbit(link: EmulatedLink, target: str, sink: subprocess.Popen[str], seconds: float) -> float:
    nbytes = int(RATE_MBIT * 1e6 / 8 * seconds)
    source = link.run_tool(
        "prfaas",
        ["source", "--connect", target, "--bytes", str(nbytes), "--seconds", str(4 * seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    source.communicate(timeout=8 * seconds)
    report = json.loads(sink.communicate(timeout=8 * seconds)[0])
    assert report["bytes"] == nbytes, report
    return float(report["mbit_s"])


def _start(link: EmulatedLink, side: Side, tool: str) -> tuple[subprocess.Popen[str], int]:
    proc = link.run_tool(
        side,
        [tool, "--listen", "0.0.0.0:0", "--seconds", "20"]
        if tool == "sink"
        else [tool, "--listen", "0.0.0.0:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, int(read_ready_line(proc, 10)["port"])


@pytest.mark.netns
@pytest.mark.slow
@needs_netns
def test_link_rate_and_delay_then_teardown() -> None:
    prefix = f"lkt{os.getpid()}"
    with EmulatedLink(RATE_MBIT, DELAY_MS, name_prefix=prefix) as link:
        assert {link.namespace("prfaas"), link.namespace("local")} <= _namespaces()
        local = link.address("local")

        sink, port = _start(link, "local", "sink")
        direct = _goodput_mbit(link, f"{local}:{port}", sink, seconds=2.0)
        assert 0.85 <= direct / RATE_MBIT <= 1.05, f"direct goodput {direct:.1f} Mbit/s"

        sink, port = _start(link, "local", "sink")
        proxied = _goodput_mbit(link, link.start_delay_proxy("prfaas", 0, local, port), sink, seconds=2.0)
        assert 0.85 <= proxied / RATE_MBIT <= 1.05, f"goodput through the delay proxy {proxied:.1f} Mbit/s"

        echo, port = _start(link, "local", "echo")
        via = link.start_delay_proxy("prfaas", 0, local, port)
        ping = link.run_tool(
            "prfaas", ["ping", "--connect", via, "--count", "10"], stdout=subprocess.PIPE, text=True
        )
        rtt = json.loads(ping.communicate(timeout=20)[0])
        assert rtt["min_ms"] >= 2 * DELAY_MS, rtt
        assert rtt["median_ms"] < 2 * DELAY_MS + 20, rtt
    assert not any(ns.startswith(f"{prefix}-") for ns in _namespaces())


@pytest.mark.netns
@needs_netns
def test_teardown_after_error_and_stale_cleanup() -> None:
    prefix = f"lks{os.getpid()}"
    subprocess.run(["ip", "netns", "add", f"{prefix}-local"], check=True)  # left by a dead run
    with pytest.raises(RuntimeError, match="boom"), EmulatedLink(RATE_MBIT, 0, name_prefix=prefix) as link:
        proc = link.run_in("local", ["sleep", "60"])
        raise RuntimeError("boom")
    assert proc.poll() is not None
    assert not any(ns.startswith(f"{prefix}-") for ns in _namespaces())


def test_tbf_params_let_tcp_fill_the_link() -> None:
    burst, limit = tbf_params(200, 9000, queue_ms=10)
    assert burst >= 4 * 9000 and limit >= burst + 200e6 / 8 * 0.010
    burst, _ = tbf_params(10_000, 1500, queue_ms=10)
    assert burst >= 10e9 / 8 * 1e-3


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_delay_proxy_delays_both_ways_and_keeps_bytes() -> None:
    """Runs in-process on loopback: no namespaces needed."""
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    proxy = await serve_delay_proxy(("127.0.0.1", 0), ("127.0.0.1", echo_port), delay_ms=20)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])

    t0 = time.monotonic()
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    assert time.monotonic() - t0 >= 0.040

    payload = os.urandom(3 << 20)
    writer.write(payload)
    writer.write_eof()  # half-close: the echo still answers, then the proxy closes both ends
    assert await asyncio.wait_for(reader.read(), timeout=10) == payload
    writer.close()
    proxy.close()
    echo.close()
