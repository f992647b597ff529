"""The one bootstrap every server starts through: the gRPC server with health and reflection,
the metrics endpoint, the `listening` line, readiness, and a graceful drain on SIGTERM/SIGINT.

    await serve(listen, add_servicers, on_started=..., ready=..., drain=..., on_stopping=..., metrics_port=...)

Health says NOT_SERVING until `ready()` returns (a node: once registered with the cache pool),
and again from the stop signal on, while `drain()` lets the requests in flight finish; then the
server stops. Once serving it prints one JSON line to stdout, `{"event": "listening", "address":
"HOST:PORT"}` (with the real port when `listen` asked for port 0), which launchers parse.

Every port is mutual TLS under the process's configuration (`prfaas.security.tls.current()`),
plaintext only when it is --insecure; `authoriser` (default: the cluster's rules,
`prfaas.security.authz.RULES`) checks each call. `token_listen` adds a port with server-only TLS,
for API clients that authenticate with a bearer token instead of a certificate (the router's).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc

from prfaas.obs.log import get_logger
from prfaas.rpc import Health, add_health_and_reflection, new_server
from prfaas.security import tls
from prfaas.security.authz import Authoriser

log = get_logger(__name__)


def dialable(listen: str, port: int) -> str:
    """The address others dial for a server bound to `listen` (a wildcard host means loopback)."""
    host = listen.rsplit(":", 1)[0]
    return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{port}"


def add_port(server: grpc.aio.Server, listen: str, cfg: tls.TlsConfig | None = None, client_certs: bool = True) -> int:
    """Binds `listen`: mutual TLS under `cfg` (default: the process's), plaintext when --insecure."""
    cfg = cfg or tls.current()
    if cfg.insecure:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, cfg.server_credentials(require_client_auth=client_certs))
    if port == 0:
        raise OSError(f"could not bind {listen}")
    return port


async def start_server(
    listen: str, add_servicers: Callable[[grpc.aio.Server], Sequence[str]], serving: bool = True,
    authoriser: Authoriser | None = None, token_listen: str = "",
) -> tuple[grpc.aio.Server, str, Health]:
    """Builds, binds and starts a server (the servicers, health, reflection); returns it, the
    address to dial, and its health. The token port's address, when asked for, is `server.token_address`."""
    cfg = tls.current()
    server = new_server([authoriser or Authoriser(cfg.domain, cfg.insecure)])
    names = add_servicers(server)
    health = add_health_and_reflection(server, names, serving)
    port = add_port(server, listen, cfg)
    token_port = add_port(server, token_listen, cfg, client_certs=False) if token_listen else 0
    await server.start()
    server.token_address = dialable(token_listen, token_port) if token_listen else ""  # type: ignore[attr-defined]
    return server, dialable(listen, port), health


async def serve(
    listen: str,
    add_servicers: Callable[[grpc.aio.Server], Sequence[str]],
    on_started: Callable[[str], Awaitable[None]] | None = None,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
    metrics_port: int = 0,
    ready: Callable[[], Awaitable[None]] | None = None,
    drain: Callable[[], Awaitable[None]] | None = None,
    authoriser: Authoriser | None = None,
    token_listen: str = "",
) -> None:
    """Runs a server until SIGTERM/SIGINT, then drains it."""
    server, address, health = await start_server(listen, add_servicers, serving=False, authoriser=authoriser,
                                                 token_listen=token_listen)
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
    listening = {"event": "listening", "address": address}
    if token_listen:
        listening["token_address"] = server.token_address  # type: ignore[attr-defined]
    print(json.dumps(listening), flush=True)
    log.info("listening", address=address, metrics_port=metrics.port if metrics else None,
             tls="off (--insecure)" if tls.current().insecure else "mutual TLS 1.3",
             token_address=listening.get("token_address"))
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
