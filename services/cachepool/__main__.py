"""`python -m services.cachepool`: the cache pool as a process (settings: prfaas/settings.py)."""

from __future__ import annotations

from prfaas.obs import metrics
from prfaas.obs.log import configure
from prfaas.rpc.serve import serve
from prfaas.settings import CachePoolSettings, parse_cachepool_settings
from prfaas.startup import run_service

from .core import CachePool
from .server import add_servicers


async def run(s: CachePoolSettings) -> None:
    configure("cachepool", s.log_level)
    metrics.install("cachepool")
    core = CachePool(s.block_size, s.heartbeat_timeout_s, s.heartbeat_interval_s)
    await core.start()
    try:
        await serve(s.listen, add_servicers(core), metrics_port=s.metrics_port)
    finally:
        await core.stop()


def main(argv: list[str] | None = None) -> None:
    run_service("cachepool", run, parse_cachepool_settings(argv))


if __name__ == "__main__":
    main()
