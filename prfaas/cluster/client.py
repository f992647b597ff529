"""The gRPC client of the cache pool. `CachePoolClient` implements `CachePoolApi`: service cores
hold it behind that protocol and never see protobuf (messages convert in `prfaas.rpc.convert`).
gRPC errors come back as the domain errors: NOT_FOUND -> UnknownNodeError,
INVALID_ARGUMENT -> InvalidArgumentError, UNAVAILABLE / DEADLINE_EXCEEDED -> PoolUnavailableError.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType

import grpc

from prfaas.cluster import (
    CacheEvent,
    CachePoolError,
    InvalidArgumentError,
    MatchResult,
    NodeInfo,
    NodeLoad,
    NodeStatus,
    PoolUnavailableError,
    RegisterResult,
    Role,
    UnknownNodeError,
)
from prfaas.rpc import channel
from prfaas.rpc.convert import (
    cache_event_to_pb,
    match_from_pb,
    node_info_to_pb,
    node_load_to_pb,
    node_status_from_pb,
    role_to_pb,
)
from prfaas.security.tls import TlsConfig
from prfaas.v1 import cachepool_pb2 as pb
from prfaas.v1 import cachepool_pb2_grpc as pb_grpc


@contextmanager
def _domain_errors() -> Iterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as e:
        code, details = e.code(), e.details() or ""
        if code == grpc.StatusCode.NOT_FOUND:
            raise UnknownNodeError(details) from e
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise InvalidArgumentError(details) from e
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise PoolUnavailableError(f"{code.name}: {details}") from e
        raise CachePoolError(f"{code.name}: {details}") from e


class CachePoolClient:
    """Async client of the cache pool at `address` (host:port). Every call has a deadline of
    `timeout_s`. Use as an async context manager, or call `close()`."""

    def __init__(self, address: str, timeout_s: float = 5.0, tls: TlsConfig | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = channel(address, expect="cachepool", tls=tls)  # mutual TLS unless --insecure
        self._stub = pb_grpc.CachePoolStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> CachePoolClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def register(self, node: NodeInfo) -> RegisterResult:
        req = pb.RegisterRequest(node=node_info_to_pb(node))
        with _domain_errors():
            r = await self._stub.Register(req, timeout=self.timeout_s)
        return RegisterResult(r.heartbeat_interval_s, r.heartbeat_timeout_s)

    async def heartbeat(
        self, node_id: str, load: NodeLoad, role: Role = Role.UNSPECIFIED, draining: bool = False
    ) -> bool:
        req = pb.HeartbeatRequest(node_id=node_id, load=node_load_to_pb(load), role=role_to_pb(role),
                                  draining=draining)
        with _domain_errors():
            r = await self._stub.Heartbeat(req, timeout=self.timeout_s)
        return r.known

    async def list_nodes(self, cluster: str = "", role: Role = Role.UNSPECIFIED) -> list[NodeStatus]:
        req = pb.ListNodesRequest(cluster=cluster, role=role_to_pb(role))
        with _domain_errors():
            r = await self._stub.ListNodes(req, timeout=self.timeout_s)
        return [node_status_from_pb(s) for s in r.nodes]

    async def publish(self, events: Sequence[CacheEvent]) -> int:
        """Sends `events` on one Publish stream; returns how many the pool applied."""

        async def stream() -> AsyncIterator[pb.CacheEvent]:
            for e in events:
                yield cache_event_to_pb(e)

        with _domain_errors():
            r = await self._stub.Publish(stream(), timeout=self.timeout_s)
        return r.events

    async def match(self, token_ids: Sequence[int]) -> MatchResult:
        with _domain_errors():
            r = await self._stub.Match(pb.MatchRequest(token_ids=token_ids), timeout=self.timeout_s)
        return match_from_pb(r)
