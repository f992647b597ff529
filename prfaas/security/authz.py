"""Authorisation on every gRPC method, from the caller's certificate (or a client's bearer token).

`Authoriser` is a grpc.aio server interceptor. An interceptor sees only the method and the
metadata, not the peer, so it wraps the method's handler: the wrapper reads the caller's identity
from the call's `auth_context()`, checks the method's rule, logs and aborts a refusal
(UNAUTHENTICATED without an identity, PERMISSION_DENIED for one the rule does not admit), and
otherwise runs the method with the identity in `caller()`, where a servicer checks what depends on
the request (a node registering under its own node id, a chunk from the prefill node the router
named). Health and reflection are open to any peer TLS admitted. A method without a rule: nobody.

Clients (kind `client` in a rule) may instead send `authorization: Bearer <token>` with a token
from the token file (`tokens.py`); each client identity (certificate name or token name) holds at
most `max_per_client` calls at once (RESOURCE_EXHAUSTED past it); the front door (which limits
its own clients) and the operator's `admin` identity are not limited.

In --insecure mode there is no identity to check: the interceptor admits every call (a token is
still required where a token file is configured) and `caller()` is None, which servicers read as
"cannot check".
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc

from prfaas.errors import NotPermitted
from prfaas.obs.log import get_logger
from prfaas.security.identity import Identity, from_auth_context
from prfaas.security.tokens import ClientLimiter, TokenFile

log = get_logger(__name__)

_CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("prfaas_caller", default=None)
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

# who may call what, by kind (prfaas/security/identity.py); docs/security.md has the table
RULES: dict[str, frozenset[str]] = {
    "/prfaas.v1.CachePool/Register": frozenset({"worker"}),
    "/prfaas.v1.CachePool/Heartbeat": frozenset({"worker"}),
    "/prfaas.v1.CachePool/Publish": frozenset({"worker"}),
    "/prfaas.v1.CachePool/ListNodes": frozenset({"worker", "router", "admin"}),
    "/prfaas.v1.CachePool/Match": frozenset({"router", "admin"}),
    "/prfaas.v1.NodeControl/SetRole": frozenset({"router"}),
    "/prfaas.v1.NodeControl/Stats": frozenset({"router", "admin"}),
    "/prfaas.v1.Prefill/Prefill": frozenset({"router"}),
    "/prfaas.v1.Prefill/ImportPrefix": frozenset({"router"}),
    "/prfaas.v1.Prefill/ExportPrefix": frozenset({"router"}),
    "/prfaas.v1.Decode/Admit": frozenset({"router"}),
    "/prfaas.v1.Decode/PushKv": frozenset({"worker"}),
    "/prfaas.v1.Router/Generate": frozenset({"client", "frontdoor", "admin"}),
}


def caller() -> Identity | None:
    """The verified identity of the call being served (None in --insecure mode)."""
    return _CALLER.get()


def require_self(node_id: str, what: str) -> None:
    """A node acts only under the node id its certificate names (`what`: for the message);
    raises NotPermitted (PERMISSION_DENIED). Nothing to check in --insecure mode."""
    who = caller()
    if who is not None and who.name != node_id:
        log.warning("call_refused", reason="another node's id", caller=str(who), node_id=node_id, what=what)
        raise NotPermitted(f"{who} may not {what} as node {node_id!r}: its certificate names {who.name!r}")


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def bearer(metadata: Any) -> str:
    for k, v in metadata or ():
        if k == "authorization":
            text = v.decode() if isinstance(v, bytes) else str(v)
            return text[7:].strip() if text[:7].lower() == "bearer " else ""
    return ""


class Authoriser(grpc.aio.ServerInterceptor):
    def __init__(self, domain: str, insecure: bool = False, rules: Mapping[str, frozenset[str]] = RULES,
                 tokens: TokenFile | None = None, max_per_client: int = 0,
                 unlimited_kinds: frozenset[str] = frozenset({"frontdoor", "admin"})) -> None:
        self.domain, self.insecure, self.rules, self.tokens = domain, insecure, rules, tokens
        self.limiter = ClientLimiter(max_per_client)
        self.unlimited_kinds = unlimited_kinds

    def check(self, method: str, context: grpc.aio.ServicerContext) -> Identity | None:
        """The caller, if the rule of `method` admits it; raises Refused."""
        kinds = self.rules.get(method, frozenset())
        who = None if self.insecure else from_auth_context(context.auth_context(), self.domain)
        if (who is None or who.kind not in kinds) and "client" in kinds and self.tokens is not None:
            token = bearer(context.invocation_metadata())
            name = self.tokens.lookup(token) if token else None
            if name is not None:
                return Identity(self.domain, "client", f"token:{name}")
            if who is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                              "a client certificate or `authorization: Bearer <token>` is required"
                              if token == "" else "the bearer token is not valid")
        if self.insecure:
            return None
        if who is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no certificate of this cluster")
        if who.kind not in kinds:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"{who} may not call {method}")
        return who

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        if self.insecure and self.tokens is None:
            return handler
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return handler._replace(**{kind: self._guard(method, behaviour)})
        return handler

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> tuple[Identity | None, str | None]:
        """The caller and the client slot it holds (release it with `self.limiter.release`)."""
        try:
            who = self.check(method, context)
            client = None
            if "client" in self.rules.get(method, ()) and who is not None and who.kind not in self.unlimited_kinds:
                client = str(who)
            if not self.limiter.try_acquire(client):
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{client} already has {self.limiter.max} requests in flight (the per-client limit)")
        except Refused as e:
            log.warning("call_refused", method=method, code=e.code.name, reason=e.message, peer=context.peer())
            await context.abort(e.code, e.message)
        return who, client

    def _guard(self, method: str, behaviour: Any) -> Any:
        if inspect.isasyncgenfunction(behaviour):
            async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                who, client = await self._admit(method, context)
                try:
                    _CALLER.set(who)
                    async for item in behaviour(request, context):
                        yield item
                finally:
                    self.limiter.release(client)

            return streamed

        async def called(request: Any, context: grpc.aio.ServicerContext) -> Any:
            who, client = await self._admit(method, context)
            try:
                _CALLER.set(who)
                return await behaviour(request, context)
            finally:
                self.limiter.release(client)

        return called
