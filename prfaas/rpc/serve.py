"""The one bootstrap every server starts through: the gRPC server with health and reflection,
the metrics endpoint, the `listening` line, readiness, and a graceful drain on SIGTERM/SIGINT.

    await serve(listen, add_servicers, on_started=..., ready=..., drain=..., on_stopping=..., metrics_port=...)

Health says NOT_SERVING until `ready()` returns (a node: once registered with the cache pool),
and again from the stop signal on, while `drain()` lets the requests in flight finish; then the
server stops. Once serving it prints one JSON line to stdout, `{"event": "listening", "address":
"HOST:PORT"}` (with the real port when `listen` asked for port 0), which launchers parse.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc

from prfaas.obs.log import get_logger
from prfaas.rpc import Health, add_health_and_reflection, new_server

log = get_logger(__name__)


def dialable(listen: str, port: int) -> str:
    """The address others dial for a server bound to `listen` (a wildcard host means loopback)."""
    host = listen.rsplit(":", 1)[0]
    return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{port}"


async def start_server(
    listen: str, add_servicers: Callable[[grpc.aio.Server], Sequence[str]], serving: bool = True
) -> tuple[grpc.aio.Server, str, Health]:
    """Builds, binds and starts a server (the servicers, health, reflection); returns it, the
    address to dial, and its health."""
    server = new_server()
    names = add_servicers(server)
    health = add_health_and_reflection(server, names, serving)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"could not bind {listen}")
    await server.start()
    return server, dialable(listen, port), health


async def serve(
    listen: str,
    add_servicers: Callable[[grpc.aio.Server], Sequence[str]],
    on_started: Callable[[str], Awaitable[None]] | None = None,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
    metrics_port: int = 0,
    ready: Callable[[], Awaitable[None]] | None = None,
    drain: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Runs a server until SIGTERM/SIGINT, then drains it."""
    server, address, health = await start_server(listen, add_servicers, serving=False)
    metrics = None
    if metrics_port:
        from prfaas.obs.metrics import start_metrics_server

        # on the host of `listen` (127.0.0.1 stays on loopback; 0.0.0.0 or an empty host: every interface)
        metrics = start_metrics_server(metrics_port, listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_started:
        await on_started(address)

    async def become_ready() -> None:
        if ready is not None:
            await ready()
        if not stop.is_set():
            health.set(True)
            log.info("serving")

    readiness = asyncio.create_task(become_ready())
    print(json.dumps({"event": "listening", "address": address}), flush=True)
    log.info("listening", address=address, metrics_port=metrics.port if metrics else None)
    await stop.wait()
    readiness.cancel()
    health.set(False)
    log.info("draining")
    if drain:
        await drain()
    log.info("stopping")
    if on_stopping:
        await on_stopping()
    await server.stop(grace=2.0)
    if metrics is not None:
        metrics.stop()
    log.info("stopped")
