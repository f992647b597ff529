"""Cluster membership and the cache pool, as plain Python: the records every service passes around,
the errors the pool raises, and `CachePoolApi`, the protocol that both the gRPC client
(`prfaas.cluster.client.CachePoolClient`) and the in-process core (`services.cachepool.core.CachePool`)
implement. Nothing here imports grpc or protobuf.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prfaas.errors import Code, PrfaasError
from prfaas.kv.prefix_index import CacheEvent, CacheEventKind


class Role(enum.StrEnum):
    UNSPECIFIED = ""
    PREFILL = "prefill"
    DECODE = "decode"
    ROUTER = "router"
    CACHEPOOL = "cachepool"


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    cluster: str                  # "prfaas" or "local"
    role: Role
    address: str                  # host:port of the node's gRPC server
    capacity_blocks: int = 0      # full-attention blocks in its pool
    capacity_slots: int = 0       # linear-state slots
    hardware: str = "cpu"         # profile name
    block_size: int = 16          # tokens per KV block
    max_request_blocks: int = 0   # decode nodes: the most blocks one request may hold; 0 = capacity_blocks
    convertible: bool = False     # local nodes: serves both roles, the router may switch it
    max_context: int = 0          # the longest sequence (prompt + output) it serves; 0 = unknown
    prefix_grid: int = 0          # its prefix hits fall on multiples of this; 0 = it caches no prefixes


@dataclass(frozen=True)
class NodeLoad:
    free_blocks: int = 0
    free_slots: int = 0
    queue_depth: int = 0          # requests waiting (prefill) or admitted but not decoding
    running: int = 0              # requests running (prefill) or in the decode batch
    egress_bytes_per_s: float = 0.0
    tokens_per_s: float = 0.0
    kv_retransmits: int = 0       # TCP retransmits on the node's KV connections (cumulative): congestion


@dataclass(frozen=True)
class NodeStatus:
    node: NodeInfo
    load: NodeLoad
    last_heartbeat_age_s: float
    draining: bool = False        # shutting down: finishing its requests, taking no new ones


@dataclass(frozen=True)
class RegisterResult:
    heartbeat_interval_s: float
    heartbeat_timeout_s: float


@dataclass(frozen=True)
class NodeHit:
    node_id: str
    cluster: str
    hit_tokens: int               # usable prefix: full blocks present and a state checkpoint at its end


@dataclass(frozen=True)
class MatchResult:
    block_size: int
    hits: list[NodeHit] = field(default_factory=list)   # nodes with a hit, longest first

    def hit_tokens(self, node_id: str) -> int:
        return next((h.hit_tokens for h in self.hits if h.node_id == node_id), 0)


class CachePoolError(PrfaasError):
    """Base of the cache pool's domain errors."""


class UnknownNodeError(CachePoolError):
    """The node is not (or no longer) a member: it must register (again)."""

    code = Code.NOT_FOUND


class InvalidArgumentError(CachePoolError):
    """The request itself is malformed (empty node id, bad address, unknown event kind...)."""

    code = Code.INVALID_ARGUMENT


class PoolUnavailableError(CachePoolError):
    """The pool could not be reached; retrying later may succeed."""

    code = Code.UNAVAILABLE


class CachePoolApi(Protocol):
    """What a service needs from the cache pool. Heartbeat answers False for an unknown node, which
    must then register again; publish raises UnknownNodeError for events from an unknown node."""

    async def register(self, node: NodeInfo) -> RegisterResult: ...

    async def heartbeat(
        self, node_id: str, load: NodeLoad, role: Role = Role.UNSPECIFIED, draining: bool = False
    ) -> bool: ...

    async def list_nodes(self, cluster: str = "", role: Role = Role.UNSPECIFIED) -> list[NodeStatus]: ...

    async def publish(self, events: Sequence[CacheEvent]) -> int: ...

    async def match(self, token_ids: Sequence[int]) -> MatchResult: ...


__all__ = [
    "CacheEvent", "CacheEventKind", "CachePoolApi", "CachePoolError", "InvalidArgumentError", "MatchResult",
    "NodeHit", "NodeInfo", "NodeLoad", "NodeStatus", "PoolUnavailableError", "RegisterResult", "Role",
    "UnknownNodeError",
]
