"""`python -m prfaas.rpc.probe [HOST:PORT]`: a service's gRPC health check (exit 0 when SERVING,
1 otherwise), under the service's own TLS configuration, for compose's healthcheck and Kubernetes'
exec probes (the kubelet's built-in gRPC probe speaks plaintext only).

The address defaults to 127.0.0.1 and the port of PRFAAS_LISTEN. TLS comes from the same PRFAAS_*
variables as the service's (PRFAAS_TLS_DIR or PRFAAS_CA/CERT/KEY, PRFAAS_INSECURE): the probe
presents the service's own certificate (named by PRFAAS_TLS_NAME, else PRFAAS_NODE_ID) and expects
the server to present it too. Health is open to any identity of the cluster.
"""

from __future__ import annotations

import asyncio
import os
import sys

from grpc_health.v1 import health_pb2, health_pb2_grpc

from prfaas.rpc import channel
from prfaas.security import tls


async def check(address: str, cfg: tls.TlsConfig, expect: str, timeout_s: float = 3.0) -> bool:
    async with channel(address, expect, tls=cfg) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str]) -> int:
    env = os.environ.get
    address = argv[0] if argv else "127.0.0.1:" + env("PRFAAS_LISTEN", ":0").rsplit(":", 1)[1]
    name = env("PRFAAS_TLS_NAME") or env("PRFAAS_NODE_ID") or "admin"
    insecure = env("PRFAAS_INSECURE", "").lower() in ("1", "true", "yes", "on")
    try:
        cfg = tls.resolve(tls_dir=env("PRFAAS_TLS_DIR", ""), ca=env("PRFAAS_CA", ""), cert=env("PRFAAS_CERT", ""),
                          key=env("PRFAAS_KEY", ""), insecure=insecure, name=name,
                          kind=name if name in ("router", "cachepool", "frontdoor", "admin") else "worker")
        own = cfg.identity.name if cfg.identity else ""
        return 0 if asyncio.run(check(address, cfg, "" if name == "admin" else own)) else 1
    except Exception as e:  # noqa: BLE001 - a probe says no, in one line
        print(f"probe {address}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
