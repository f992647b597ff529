"""Who is on the other end: the identity a verified certificate names.

Every certificate of a cluster carries one URI SAN `prfaas://<domain>/<kind>/<name>`: the domain is
the cluster's trust domain (its CA's), the kind what the holder is, the name its node id (or its
service name). Kinds:
- `worker`: a prefill, decode or convertible node, named by its node id (its role may change, its
  identity does not);
- `router`, `cachepool`, `frontdoor`: the services of those names;
- `client`: a user of the router's API; `admin`: an operator's tools (`prfaas status`).

Only a certificate the CA verified is read here (mutual TLS did that before any call or frame), and
only in the peer's own trust domain being ours (`expected_domain`) does the identity count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEME = "prfaas://"
KINDS = ("worker", "router", "cachepool", "frontdoor", "client", "admin")


@dataclass(frozen=True)
class Identity:
    domain: str
    kind: str
    name: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.domain}/{self.kind}/{self.name}"

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


def parse_uri(uri: str) -> Identity | None:
    """`prfaas://domain/kind/name` -> Identity; anything else -> None."""
    if not uri.startswith(SCHEME):
        return None
    parts = uri[len(SCHEME):].split("/")
    if len(parts) != 3 or not all(parts) or parts[1] not in KINDS:
        return None
    return Identity(*parts)


def from_sans(values: list[str], domain: str) -> Identity | None:
    """The identity among a certificate's SAN values, in `domain` only."""
    for v in values:
        who = parse_uri(v)
        if who is not None and who.domain == domain:
            return who
    return None


def from_peercert(peercert: dict[str, Any] | None, domain: str) -> Identity | None:
    """From `SSLSocket.getpeercert()` / asyncio's `get_extra_info("peercert")`."""
    sans = [v for kind, v in (peercert or {}).get("subjectAltName", ()) if kind == "URI"]
    return from_sans(sans, domain)


def from_auth_context(auth: dict[str, list[bytes]], domain: str) -> Identity | None:
    """From grpc's `context.auth_context()` (empty on an insecure port)."""
    sans = [v.decode("utf-8", "replace") for v in auth.get("x509_subject_alternative_name", [])]
    return from_sans(sans, domain)
