"""The one bootstrap every server starts through: the gRPC server with health and reflection,
the metrics endpoint, the `listening` line, and a graceful stop on SIGTERM/SIGINT.

    await serve(listen, add_servicers, on_started, on_stopping, metrics_port)

Once serving it prints one JSON line to stdout, `{"event": "listening", "address": "HOST:PORT"}`
(with the real port when `listen` asked for port 0), which launchers parse.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc

from prfaas.obs.log import get_logger
from prfaas.rpc import add_health_and_reflection, new_server

log = get_logger(__name__)


def dialable(listen: str, port: int) -> str:
    """The address others dial for a server bound to `listen` (a wildcard host means loopback)."""
    host = listen.rsplit(":", 1)[0]
    return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{port}"


async def start_server(
    listen: str, add_servicers: Callable[[grpc.aio.Server], Sequence[str]]
) -> tuple[grpc.aio.Server, str]:
    """Builds, binds and starts a server (the servicers, health, reflection); returns it and the
    address to dial."""
    server = new_server()
    names = add_servicers(server)
    add_health_and_reflection(server, names)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"could not bind {listen}")
    await server.start()
    return server, dialable(listen, port)


async def serve(
    listen: str,
    add_servicers: Callable[[grpc.aio.Server], Sequence[str]],
    on_started: Callable[[str], Awaitable[None]] | None = None,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
    metrics_port: int = 0,
) -> None:
    """Runs a server until SIGTERM/SIGINT."""
    server, address = await start_server(listen, add_servicers)
    metrics = None
    if metrics_port:
        from prfaas.obs.metrics import start_metrics_server

        metrics = start_metrics_server(metrics_port, listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_started:
        await on_started(address)
    print(json.dumps({"event": "listening", "address": address}), flush=True)
    log.info("listening", address=address, metrics_port=metrics.port if metrics else None)
    await stop.wait()
    log.info("stopping")
    if on_stopping:
        await on_stopping()
    await server.stop(grace=2.0)
    if metrics is not None:
        metrics.stop()
    log.info("stopped")
