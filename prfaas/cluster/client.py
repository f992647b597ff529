"""The gRPC client of the cache pool, and the conversions between its protobuf messages and the plain
records of `prfaas.cluster` (the servicer in `services/cachepool/server.py` uses the same ones).

`CachePoolClient` implements `CachePoolApi`: service cores hold it behind that protocol and never see
protobuf. gRPC errors come back as the domain errors: NOT_FOUND -> UnknownNodeError,
INVALID_ARGUMENT -> InvalidArgumentError, UNAVAILABLE / DEADLINE_EXCEEDED -> PoolUnavailableError.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType

import grpc

from prfaas.cluster import (
    CacheEvent,
    CacheEventKind,
    CachePoolError,
    InvalidArgumentError,
    MatchResult,
    NodeHit,
    NodeInfo,
    NodeLoad,
    NodeStatus,
    PoolUnavailableError,
    RegisterResult,
    Role,
    UnknownNodeError,
)
from prfaas.rpc import channel_options
from prfaas.v1 import cachepool_pb2 as pb
from prfaas.v1 import cachepool_pb2_grpc as pb_grpc
from prfaas.v1 import common_pb2

# --- conversions ---------------------------------------------------------------------------------
_ROLE_TO_PB: dict[Role, common_pb2.Role] = {
    Role.UNSPECIFIED: common_pb2.ROLE_UNSPECIFIED,
    Role.PREFILL: common_pb2.PREFILL,
    Role.DECODE: common_pb2.DECODE,
    Role.ROUTER: common_pb2.ROUTER,
    Role.CACHEPOOL: common_pb2.CACHEPOOL,
}
_ROLE_FROM_PB: dict[int, Role] = {v: k for k, v in _ROLE_TO_PB.items()}
_KIND_TO_PB: dict[CacheEventKind, pb.CacheEventKind] = {k: pb.CacheEventKind.Value(k.name) for k in CacheEventKind}
_KIND_FROM_PB: dict[int, CacheEventKind] = {v: k for k, v in _KIND_TO_PB.items()}


def role_to_pb(role: Role) -> common_pb2.Role:
    return _ROLE_TO_PB[role]


def role_from_pb(value: int) -> Role:
    try:
        return _ROLE_FROM_PB[value]
    except KeyError:
        raise InvalidArgumentError(f"unknown role {value}") from None


def node_info_to_pb(n: NodeInfo) -> common_pb2.NodeInfo:
    return common_pb2.NodeInfo(
        node_id=n.node_id,
        cluster=n.cluster,
        role=role_to_pb(n.role),
        address=n.address,
        capacity_blocks=n.capacity_blocks,
        capacity_slots=n.capacity_slots,
        hardware=n.hardware,
    )


def node_info_from_pb(m: common_pb2.NodeInfo) -> NodeInfo:
    return NodeInfo(
        node_id=m.node_id,
        cluster=m.cluster,
        role=role_from_pb(m.role),
        address=m.address,
        capacity_blocks=m.capacity_blocks,
        capacity_slots=m.capacity_slots,
        hardware=m.hardware,
    )


def node_load_to_pb(x: NodeLoad) -> common_pb2.NodeLoad:
    return common_pb2.NodeLoad(
        free_blocks=x.free_blocks,
        free_slots=x.free_slots,
        queue_depth=x.queue_depth,
        running=x.running,
        egress_bytes_per_s=x.egress_bytes_per_s,
        tokens_per_s=x.tokens_per_s,
        kv_retransmits=x.kv_retransmits,
    )


def node_load_from_pb(m: common_pb2.NodeLoad) -> NodeLoad:
    return NodeLoad(
        free_blocks=m.free_blocks,
        free_slots=m.free_slots,
        queue_depth=m.queue_depth,
        running=m.running,
        egress_bytes_per_s=m.egress_bytes_per_s,
        tokens_per_s=m.tokens_per_s,
        kv_retransmits=m.kv_retransmits,
    )


def node_status_to_pb(s: NodeStatus) -> pb.NodeStatus:
    return pb.NodeStatus(
        node=node_info_to_pb(s.node),
        load=node_load_to_pb(s.load),
        last_heartbeat_age_s=s.last_heartbeat_age_s,
    )


def node_status_from_pb(m: pb.NodeStatus) -> NodeStatus:
    return NodeStatus(node_info_from_pb(m.node), node_load_from_pb(m.load), m.last_heartbeat_age_s)


def cache_event_to_pb(e: CacheEvent) -> pb.CacheEvent:
    return pb.CacheEvent(node_id=e.node_id, kind=_KIND_TO_PB[e.kind], block_hashes=e.block_hashes)


def cache_event_from_pb(m: pb.CacheEvent) -> CacheEvent:
    kind = _KIND_FROM_PB.get(m.kind)
    if kind is None:
        raise InvalidArgumentError(f"cache event kind must be set, got {m.kind}")
    return CacheEvent(m.node_id, kind, tuple(m.block_hashes))


def match_to_pb(r: MatchResult) -> pb.MatchResponse:
    return pb.MatchResponse(
        hits=[pb.NodeHit(node_id=h.node_id, cluster=h.cluster, hit_tokens=h.hit_tokens) for h in r.hits],
        block_size=r.block_size,
    )


def match_from_pb(m: pb.MatchResponse) -> MatchResult:
    return MatchResult(m.block_size, [NodeHit(h.node_id, h.cluster, h.hit_tokens) for h in m.hits])


# --- client --------------------------------------------------------------------------------------
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


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

    def __init__(self, address: str, timeout_s: float = 5.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address, options=[*channel_options(), *_RECONNECT_OPTIONS])
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

    async def heartbeat(self, node_id: str, load: NodeLoad, role: Role = Role.UNSPECIFIED) -> bool:
        req = pb.HeartbeatRequest(node_id=node_id, load=node_load_to_pb(load), role=role_to_pb(role))
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
