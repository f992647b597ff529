"""The TLS probes' PKI, on the library's (prfaas/security/pki.py, tls.py, identity.py): a CA and
per-node leaf certificates, and the `ssl` contexts for mutual TLS with them.

A node's certificate names its node id as `DNS:<id>` (so that OpenSSL's own hostname check pins
the peer's node id when the dialer passes it as `server_hostname`, and gRPC's
`grpc.ssl_target_name_override` does the same) and as the URI SAN `prfaas://<cluster>/<kind>/<id>`
(kind `router` for the router, else `worker`), the identity authorisation reads.

    pki = make_pki(tmp_dir, "dev", ["router", "prefill-0", "decode-0"])
    server_ctx = server_context(pki, "decode-0"); client_ctx = client_context(pki, "prefill-0")
    client_ctx.wrap_socket(sock, server_hostname="decode-0")    # pins the server's node id
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prfaas.security import pki as library_pki
from prfaas.security.identity import SCHEME, from_peercert
from prfaas.security.tls import TlsConfig

URI_PREFIX = SCHEME


@dataclass(frozen=True)
class Pki:
    """Paths of a CA certificate and each node's certificate and key (PEM)."""

    dir: Path
    cluster: str
    ca: Path

    def cert(self, node_id: str) -> Path:
        return self.dir / f"{node_id}.crt"

    def key(self, node_id: str) -> Path:
        return self.dir / f"{node_id}.key"


def make_pki(directory: Path, cluster: str, node_ids: list[str]) -> Pki:
    """Writes ca.crt and <node>.crt / <node>.key (keys mode 0600) for each node id."""
    library_pki.write_ca(directory, cluster)
    for node in node_ids:
        library_pki.issue(directory, "router" if node == "router" else "worker", node, library_pki.DEV_HOSTS)
    return Pki(directory, cluster, directory / "ca.crt")


def _config(pki: Pki, node_id: str) -> TlsConfig:
    return TlsConfig(False, pki.ca, pki.cert(node_id), pki.key(node_id))


def server_context(pki: Pki, node_id: str) -> ssl.SSLContext:
    """TLS 1.3 only; the client must present a certificate from the CA."""
    return _config(pki, node_id).server_context()


def client_context(pki: Pki, node_id: str) -> ssl.SSLContext:
    """TLS 1.3 only; verifies the server against the CA and (check_hostname) the node id passed
    as `server_hostname`."""
    return _config(pki, node_id).client_context()


def peer_node(peercert: dict[str, Any] | None, cluster: str) -> str | None:
    """The node id in a verified peer certificate (`getpeercert()` of an SSLSocket or SSLObject,
    `transport.get_extra_info("peercert")` in asyncio), in `cluster`, else None."""
    who = from_peercert(peercert, cluster)
    return who.name if who else None
