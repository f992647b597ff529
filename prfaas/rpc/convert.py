"""Records <-> protobuf messages, in one place: the servicers and the clients of every service
convert here (the cores only see `prfaas.messages` and `prfaas.cluster` records)."""

from __future__ import annotations

from prfaas.cluster import (
    CacheEvent,
    CacheEventKind,
    InvalidArgumentError,
    MatchResult,
    NodeHit,
    NodeInfo,
    NodeLoad,
    NodeStatus,
    Role,
)
from prfaas.messages import SamplingParams, TokenLogprob
from prfaas.v1 import cachepool_pb2 as cp_pb
from prfaas.v1 import common_pb2

# --- roles ---------------------------------------------------------------------------------------
_ROLE_TO_PB: dict[Role, common_pb2.Role] = {
    Role.UNSPECIFIED: common_pb2.ROLE_UNSPECIFIED,
    Role.PREFILL: common_pb2.PREFILL,
    Role.DECODE: common_pb2.DECODE,
    Role.ROUTER: common_pb2.ROUTER,
    Role.CACHEPOOL: common_pb2.CACHEPOOL,
}
_ROLE_FROM_PB: dict[int, Role] = {v: k for k, v in _ROLE_TO_PB.items()}


def role_to_pb(role: Role) -> common_pb2.Role:
    return _ROLE_TO_PB[role]


def role_from_pb(value: int) -> Role:
    try:
        return _ROLE_FROM_PB[value]
    except KeyError:
        raise InvalidArgumentError(f"unknown role {value}") from None


# --- sampling ------------------------------------------------------------------------------------
def sampling_fields(p: object) -> dict[str, object]:
    """The sampling fields of `p` (a `SamplingParams` or anything with the same attributes, as the
    front door's router request) as keyword arguments for `common_pb2.SamplingParams` or the flat
    `GenerateRequest`, which share their names; the optional ones only when set."""
    names = ("max_tokens", "temperature", "top_p", "top_k", "ignore_eos")
    fields: dict[str, object] = {n: getattr(p, n) for n in names}
    fields["stop_token_ids"] = list(p.stop_token_ids)
    for name in ("seed", "logprobs"):
        if getattr(p, name) is not None:
            fields[name] = getattr(p, name)
    return fields


def sampling_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**sampling_fields(p))


def sampling_from_pb(m: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=m.max_tokens,
        temperature=m.temperature,
        top_p=1.0 if m.top_p == 0 else m.top_p,  # 0: unset; anything else is checked as given
        top_k=m.top_k,
        seed=m.seed if m.HasField("seed") else None,
        stop_token_ids=tuple(m.stop_token_ids),
        logprobs=m.logprobs if m.HasField("logprobs") else None,
        ignore_eos=m.ignore_eos,
    )


def logprob_to_pb(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        logprob=lp.logprob, top_token_ids=[t for t, _ in lp.top], top_logprobs=[v for _, v in lp.top]
    )


def logprob_from_pb(m: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(m.logprob, tuple(zip(m.top_token_ids, m.top_logprobs, strict=True)))


# --- membership ----------------------------------------------------------------------------------
_INFO_FIELDS = ("node_id", "cluster", "address", "capacity_blocks", "capacity_slots", "hardware", "block_size",
                "max_request_blocks", "convertible", "max_context", "prefix_grid", "cache_dtype")


def node_info_to_pb(n: NodeInfo) -> common_pb2.NodeInfo:
    return common_pb2.NodeInfo(role=role_to_pb(n.role), wire_dtypes=list(n.wire_dtypes),
                               **{f: getattr(n, f) for f in _INFO_FIELDS})


def node_info_from_pb(m: common_pb2.NodeInfo) -> NodeInfo:
    return NodeInfo(role=role_from_pb(m.role), wire_dtypes=tuple(m.wire_dtypes),
                    **{f: getattr(m, f) for f in _INFO_FIELDS})


_LOAD_FIELDS = ("free_blocks", "free_slots", "queue_depth", "running", "egress_bytes_per_s", "tokens_per_s",
                "kv_retransmits")


def node_load_to_pb(x: NodeLoad) -> common_pb2.NodeLoad:
    return common_pb2.NodeLoad(**{f: getattr(x, f) for f in _LOAD_FIELDS})


def node_load_from_pb(m: common_pb2.NodeLoad) -> NodeLoad:
    return NodeLoad(**{f: getattr(m, f) for f in _LOAD_FIELDS})


def node_status_to_pb(s: NodeStatus) -> cp_pb.NodeStatus:
    return cp_pb.NodeStatus(
        node=node_info_to_pb(s.node),
        load=node_load_to_pb(s.load),
        last_heartbeat_age_s=s.last_heartbeat_age_s,
        draining=s.draining,
    )


def node_status_from_pb(m: cp_pb.NodeStatus) -> NodeStatus:
    return NodeStatus(node_info_from_pb(m.node), node_load_from_pb(m.load), m.last_heartbeat_age_s, m.draining)


# --- the prefix index ----------------------------------------------------------------------------
_KIND_TO_PB: dict[CacheEventKind, cp_pb.CacheEventKind] = {
    k: cp_pb.CacheEventKind.Value(k.name) for k in CacheEventKind
}
_KIND_FROM_PB: dict[int, CacheEventKind] = {v: k for k, v in _KIND_TO_PB.items()}


def cache_event_to_pb(e: CacheEvent) -> cp_pb.CacheEvent:
    return cp_pb.CacheEvent(node_id=e.node_id, kind=_KIND_TO_PB[e.kind], block_hashes=e.block_hashes)


def cache_event_from_pb(m: cp_pb.CacheEvent) -> CacheEvent:
    kind = _KIND_FROM_PB.get(m.kind)
    if kind is None:
        raise InvalidArgumentError(f"cache event kind must be set, got {m.kind}")
    return CacheEvent(m.node_id, kind, tuple(m.block_hashes))


def match_to_pb(r: MatchResult) -> cp_pb.MatchResponse:
    return cp_pb.MatchResponse(
        hits=[cp_pb.NodeHit(node_id=h.node_id, cluster=h.cluster, hit_tokens=h.hit_tokens) for h in r.hits],
        block_size=r.block_size,
    )


def match_from_pb(m: cp_pb.MatchResponse) -> MatchResult:
    return MatchResult(m.block_size, [NodeHit(h.node_id, h.cluster, h.hit_tokens) for h in m.hits])
