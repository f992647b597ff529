"""Mutual TLS on grpc.aio with node-id certificates (bench/tls_certs.py), and authorisation from
the peer certificate, as a small working example to lift (tests/test_tls_groundwork.py runs it).

- Server: `grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=True)`:
  a client without a certificate from the CA fails the handshake (the call sees UNAVAILABLE).
- Client: `grpc.ssl_channel_credentials(ca, key, chain)` and, because certificates name node ids
  rather than hosts, the channel option `("grpc.ssl_target_name_override", "<server node id>")`:
  the server certificate must carry that name (DNS SAN) whatever address is dialled.
- Identity: `context.auth_context()` maps "x509_subject_alternative_name" to every SAN (DNS and
  URI alike, as bytes), "x509_common_name", "x509_pem_cert", "transport_security_type" (b"ssl");
  `context.peer_identity_key()` is "x509_subject_alternative_name" and `context.peer_identities()`
  its values. This reads the node id from the URI SAN `prfaas://<cluster>/<kind>/<id>`
  (prfaas/security/identity.py; the library's own interceptor is prfaas/security/authz.py).
- Authorisation: a grpc.aio server interceptor sees only the method and metadata, not the peer, so
  `NodeIdentityInterceptor` wraps the method's handler instead: the wrapper reads the caller's node
  id from the call's context and aborts with PERMISSION_DENIED (UNAUTHENTICATED without one) unless
  the method's rule admits it.

    python bench/grpc_mtls_example.py      # prints what the servicer read, and two refusals
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tls_certs import Pki, make_pki  # noqa: E402

from prfaas.security.identity import from_auth_context  # noqa: E402

METHOD = "/prfaas.example.Whoami/Call"
Rule = Callable[[str], bool]  # node id -> allowed


def node_of(context: grpc.aio.ServicerContext, cluster: str) -> str | None:
    """The caller's node id from its verified certificate's URI SAN, or None."""
    who = from_auth_context(context.auth_context(), cluster)
    return who.name if who else None


class NodeIdentityInterceptor(grpc.aio.ServerInterceptor):
    """Admits a call only when `rules[method](caller node id)` is true (methods without a rule: no one)."""

    def __init__(self, cluster: str, rules: dict[str, Rule]) -> None:
        self.cluster, self.rules = cluster, rules

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        rule = self.rules.get(details.method, lambda node: False)
        cluster = self.cluster

        def guard(behaviour: Any) -> Any:
            async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
                node = node_of(context, cluster)
                if node is None:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no node certificate")
                if not rule(node):
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{node} may not call {details.method}")
                return await behaviour(request, context)

            return checked

        if handler.unary_unary is not None:  # stream_unary (PushKv) wraps the same way
            return handler._replace(unary_unary=guard(handler.unary_unary))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=guard(handler.stream_unary))
        return handler


def whoami(cluster: str) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
    """A servicer method answering with what the server read from the caller's certificate."""

    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        auth = context.auth_context()
        return json.dumps({
            "node": node_of(context, cluster),
            "identity_key": context.peer_identity_key(),
            "identities": [v.decode() for v in context.peer_identities() or []],
            "common_name": [v.decode() for v in auth.get("x509_common_name", [])],
            "auth_keys": sorted(auth),
        }).encode()

    return call


def _read(p: Path) -> bytes:
    return p.read_bytes()


async def serve(pki: Pki, node_id: str, rules: dict[str, Rule]) -> tuple[grpc.aio.Server, int]:
    creds = grpc.ssl_server_credentials([(_read(pki.key(node_id)), _read(pki.cert(node_id)))],
                                        root_certificates=_read(pki.ca), require_client_auth=True)
    server = grpc.aio.server(interceptors=[NodeIdentityInterceptor(pki.cluster, rules)])
    handler = grpc.unary_unary_rpc_method_handler(whoami(pki.cluster))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("prfaas.example.Whoami", {"Call": handler})])
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, port


def channel(pki: Pki, client_id: str | None, port: int, server_id: str, ca: Path | None = None) -> grpc.aio.Channel:
    """A channel presenting `client_id`'s certificate (None: none) that expects `server_id`."""
    key = _read(pki.key(client_id)) if client_id else None
    chain = _read(pki.cert(client_id)) if client_id else None
    creds = grpc.ssl_channel_credentials(_read(ca or pki.ca), private_key=key, certificate_chain=chain)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", server_id)])


async def call(ch: grpc.aio.Channel, timeout_s: float = 10) -> dict[str, Any]:
    reply = await ch.unary_unary(METHOD)(b"", timeout=timeout_s)
    return dict(json.loads(reply))


async def demo() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp), "example", ["router", "decode-0", "prefill-0"])
        server, port = await serve(pki, "decode-0", {METHOD: lambda node: node == "router"})
        try:
            async with channel(pki, "router", port, "decode-0") as ch:
                print("router:", await call(ch))
            for who in ("prefill-0", None):
                async with channel(pki, who, port, "decode-0") as ch:
                    try:
                        await call(ch, timeout_s=5)
                    except grpc.aio.AioRpcError as e:
                        print(f"{who or 'no certificate'}: {e.code().name}: {e.details()}")
        finally:
            await server.stop(None)


if __name__ == "__main__":
    asyncio.run(demo())
