"""`python -m services.cachepool`: the cache pool as a process.

Configuration is read here and only here: command-line flags, with PRFAAS_* environment variables
as their defaults. Once serving it prints one JSON line to stdout,
`{"event": "listening", "address": "HOST:PORT"}`, which launchers parse to learn the port when
`--listen HOST:0` is used. SIGTERM or SIGINT stops it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from dataclasses import dataclass

from prfaas.obs import metrics
from prfaas.obs.log import configure, get_logger
from services.cachepool.core import CachePool
from services.cachepool.server import start_server


@dataclass(frozen=True)
class CachePoolSettings:
    listen: str
    block_size: int
    heartbeat_timeout_s: float
    heartbeat_interval_s: float | None   # None: a third of the timeout
    metrics_port: int                    # 0: no metrics endpoint
    log_level: str


def parse_settings(argv: list[str] | None = None) -> CachePoolSettings:
    def env(name: str, default: str) -> str:
        return os.environ.get(f"PRFAAS_{name}", default)

    p = argparse.ArgumentParser(prog="python -m services.cachepool", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default=env("LISTEN", "127.0.0.1:50050"))
    p.add_argument("--block-size", type=int, default=int(env("BLOCK_SIZE", "16")))
    p.add_argument("--heartbeat-timeout-s", type=float, default=float(env("HEARTBEAT_TIMEOUT_S", "10")))
    p.add_argument("--heartbeat-interval-s", type=float, default=float(env("HEARTBEAT_INTERVAL_S", "0")))
    p.add_argument("--metrics-port", type=int, default=int(env("METRICS_PORT", "0")))
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    if a.block_size <= 0 or a.heartbeat_timeout_s <= 0 or a.heartbeat_interval_s < 0:
        p.error("block size and heartbeat timeout must be positive, the interval not negative")
    return CachePoolSettings(
        listen=a.listen, block_size=a.block_size, heartbeat_timeout_s=a.heartbeat_timeout_s,
        heartbeat_interval_s=a.heartbeat_interval_s or None, metrics_port=a.metrics_port,
        log_level=a.log_level,
    )


async def serve(settings: CachePoolSettings) -> None:
    log = get_logger("cachepool")
    core = CachePool(settings.block_size, settings.heartbeat_timeout_s, settings.heartbeat_interval_s)
    await core.start()
    server, port = await start_server(core, settings.listen)
    metrics_server = None
    if settings.metrics_port:  # on the host of the gRPC port (127.0.0.1 stays on loopback)
        host = settings.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"
        metrics_server = metrics.start_metrics_server(settings.metrics_port, host)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    host = settings.listen.rpartition(":")[0]
    address = f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{port}"
    print(json.dumps({"event": "listening", "address": address}), flush=True)
    log.info("listening", address=address, metrics_port=metrics_server.port if metrics_server else None,
             block_size=settings.block_size, heartbeat_timeout_s=settings.heartbeat_timeout_s)

    await stop.wait()
    log.info("stopping")
    await server.stop(grace=2.0)
    await core.stop()
    if metrics_server is not None:
        metrics_server.stop()
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    configure("cachepool", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
