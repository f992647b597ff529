"""Routing policies, shared unchanged by the live router and the simulator.

The router describes every node it could use as a `NodeView` (including that node's usable prefix
hit for this prompt, from the cache pool) and asks a policy to `route` a `RouteQuery`. The answer is
a `RouteDecision`; when no node can serve, `NoCapacityError`. Policies keep no per-request state.

A decision is made in the llm-d shape, in three steps:

1. **Cluster choice** (the only part that differs between policies). `HomogeneousPolicy` always
   prefills locally; `NaivePolicy` always prefills on the PrfaaS cluster; `PrfaasPolicy` applies the
   paper's threshold rules to the uncached length (below). A forced route ("local" or "prfaas") in
   the query overrides the choice and never falls back; an automatic choice falls back to the other
   cluster when the chosen one has no usable prefill node.
2. **Filter** (`eligible`). Keeps the nodes of the wanted cluster and role that can take the request
   now (free KV blocks, not `busy`). When the chosen cluster has such nodes but all are busy, the
   request waits (`NoCapacityError` with `busy`): an automatic choice falls back to the other cluster
   only when the chosen one has no node with free blocks at all.
3. **Scorers and picker.** Each scorer maps a node to [0, 1]. `prefix_score` is the node's hit
   as a fraction of the prompt: it makes the choice cache-affine. `load_score` is 1 / (1 + queued +
   running): it prefers idle nodes. `space_score` is the node's share of the most free blocks among
   the candidates. The picker (`pick`) compares the scorers lexicographically, in the order given,
   and breaks exact ties by node id, so a prefill node is "the longest hit, then the least loaded"
   and a decode node is "the longest hit (the KV it need not be sent), then the least loaded, then the
   most free space", deterministically.

The PrfaaS rules (PAPER.md), with `l_pd` and `l_prfaas` the longest usable hit among the prefill
nodes of each cluster and `t` the threshold:

- bandwidth "scarce": `l_total - l_pd <= t` prefills locally, else offloads. Hits in the PrfaaS
  cluster do not change the choice (they still shorten the offloaded prefill).
- bandwidth "abundant": `l_prefix = max(l_prfaas, l_pd)`; `l_total - l_prefix <= t` prefills locally,
  else offloads. When the longer prefix sits in the other cluster, the decision says so in
  `prefix_from` and counts it as cached: the caller moves that prefix across before prefilling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from prfaas.errors import Code, PrfaasError

Cluster = Literal["prfaas", "local"]
Role = Literal["prefill", "decode"]
Forced = Literal["auto", "local", "prfaas"]


@dataclass(frozen=True)
class NodeView:
    node_id: str
    cluster: Cluster
    role: Role
    queue_depth: int = 0       # requests waiting on the node
    running: int = 0           # requests being served on the node
    free_blocks: int = 1 << 30 # free KV blocks; 0 means the node cannot take a request
    hit_tokens: int = 0        # usable prefix hit for this prompt on this node
    busy: bool = False         # cannot take this request now (the live router's capacity accounting)

    @property
    def load(self) -> int:
        return self.queue_depth + self.running


@dataclass(frozen=True)
class RouteQuery:
    request_id: str
    prompt_tokens: int
    forced: Forced = "auto"


@dataclass(frozen=True)
class RouteDecision:
    route: Cluster                 # where the prefill runs
    prefill_node: str
    decode_node: str
    cached_tokens: int             # prefix the prefill node reuses (after any move)
    uncached_tokens: int           # tokens the prefill node computes
    reason: str
    prefix_from: Cluster | None = None   # abundant mode: the prefix is moved from this cluster


class NoCapacityError(PrfaasError):
    """No node of the needed cluster and role can take the request. `busy`: there are such nodes,
    all busy now (the request may wait); otherwise there are none."""

    code = Code.RESOURCE_EXHAUSTED

    def __init__(self, message: str, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


class RoutingPolicy(Protocol):
    name: str

    def route(self, query: RouteQuery, nodes: Sequence[NodeView]) -> RouteDecision: ...


# --- filter, scorers, picker --------------------------------------------------------------------
Scorer = Callable[[NodeView], float]


def present(nodes: Sequence[NodeView], cluster: Cluster, role: Role) -> list[NodeView]:
    """Nodes of the cluster and role that could serve (free KV blocks), busy or not."""
    return [n for n in nodes if n.cluster == cluster and n.role == role and n.free_blocks > 0]


def eligible(nodes: Sequence[NodeView], cluster: Cluster, role: Role) -> list[NodeView]:
    """Those that can take the request now."""
    return [n for n in present(nodes, cluster, role) if not n.busy]


def prefix_score(prompt_tokens: int) -> Scorer:
    return lambda n: min(n.hit_tokens, prompt_tokens) / prompt_tokens if prompt_tokens > 0 else 0.0


def load_score(n: NodeView) -> float:
    return 1.0 / (1.0 + n.load)


def space_score(candidates: Sequence[NodeView]) -> Scorer:
    most = max((n.free_blocks for n in candidates), default=0)
    return lambda n: n.free_blocks / most if most > 0 else 0.0


def pick(candidates: Sequence[NodeView], scorers: Sequence[Scorer]) -> NodeView:
    """Highest scores, compared lexicographically; exact ties go to the smallest node id."""
    best = min(candidates, key=lambda n: (tuple(-s(n) for s in scorers), n.node_id))
    return best


def longest_hit(nodes: Sequence[NodeView], cluster: Cluster, prompt_tokens: int) -> int:
    return max((min(n.hit_tokens, prompt_tokens) for n in eligible(nodes, cluster, "prefill")), default=0)


# --- policies -----------------------------------------------------------------------------------
class _Policy:
    name = "base"

    def choose(self, query: RouteQuery, nodes: Sequence[NodeView]) -> tuple[Cluster, str, Cluster | None]:
        """(cluster, reason, prefix_from) for an automatic route."""
        raise NotImplementedError

    def route(self, query: RouteQuery, nodes: Sequence[NodeView]) -> RouteDecision:
        if query.prompt_tokens <= 0:
            raise ValueError(f"request {query.request_id}: prompt_tokens must be positive")
        if query.forced != "auto":
            cluster, reason, prefix_from = query.forced, f"forced {query.forced}", None
        else:
            cluster, reason, prefix_from = self.choose(query, nodes)
        candidates = eligible(nodes, cluster, "prefill")
        if not candidates and query.forced == "auto" and not present(nodes, cluster, "prefill"):
            other: Cluster = "local" if cluster == "prfaas" else "prfaas"
            if present(nodes, other, "prefill"):
                cluster, reason, prefix_from = other, f"{reason}; fallback: no {cluster} prefill node", None
                candidates = eligible(nodes, cluster, "prefill")
        if not candidates:
            busy = bool(present(nodes, cluster, "prefill"))
            raise NoCapacityError(f"request {query.request_id}: no {cluster} prefill node can take it", busy)
        decoders = eligible(nodes, "local", "decode")
        if not decoders:
            busy = bool(present(nodes, "local", "decode"))
            raise NoCapacityError(f"request {query.request_id}: no local decode node can take it", busy)
        prefill = pick(candidates, [prefix_score(query.prompt_tokens), load_score])
        # a decode node holding the conversation (its own prefix cache) is sent only the rest of the KV
        decode = pick(decoders, [prefix_score(query.prompt_tokens), load_score, space_score(decoders)])
        cached = min(prefill.hit_tokens, query.prompt_tokens)
        if prefix_from is not None:
            cached = max(cached, longest_hit(nodes, prefix_from, query.prompt_tokens))
        cached = min(cached, query.prompt_tokens - 1)  # at least one token is computed
        return RouteDecision(
            cluster, prefill.node_id, decode.node_id, cached, query.prompt_tokens - cached, reason, prefix_from
        )


class HomogeneousPolicy(_Policy):
    """Local PD only: every prefill on a PD-P node."""

    name = "homogeneous"

    def choose(self, query: RouteQuery, nodes: Sequence[NodeView]) -> tuple[Cluster, str, Cluster | None]:
        return "local", "homogeneous", None


class NaivePolicy(_Policy):
    """Every prefill on the PrfaaS cluster, every decode local; no length routing."""

    name = "naive"

    def choose(self, query: RouteQuery, nodes: Sequence[NodeView]) -> tuple[Cluster, str, Cluster | None]:
        return "prfaas", "naive", None


class PrfaasPolicy(_Policy):
    """Offload only long uncached prefills. `threshold` may be changed at run time (controllers)."""

    name = "prfaas"

    def __init__(self, threshold: float, bandwidth_mode: Literal["scarce", "abundant"] = "scarce") -> None:
        if bandwidth_mode not in ("scarce", "abundant"):
            raise ValueError(f"bandwidth_mode must be 'scarce' or 'abundant', got {bandwidth_mode!r}")
        self.bandwidth_mode = bandwidth_mode
        self.threshold = threshold

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"threshold must be >= 0 tokens, got {value}")
        self._threshold = float(value)

    def choose(self, query: RouteQuery, nodes: Sequence[NodeView]) -> tuple[Cluster, str, Cluster | None]:
        total, t = query.prompt_tokens, self._threshold
        l_pd = longest_hit(nodes, "local", total)
        if self.bandwidth_mode == "scarce":
            if total - l_pd <= t:
                return "local", f"scarce: uncached {total - l_pd} <= t {t:.0f}", None
            return "prfaas", f"scarce: uncached {total - l_pd} > t {t:.0f}", None
        l_prfaas = longest_hit(nodes, "prfaas", total)
        l_prefix = max(l_prfaas, l_pd)
        uncached = total - l_prefix
        if uncached <= t:
            moved: Cluster | None = "prfaas" if l_prfaas > l_pd else None
            return "local", f"abundant: uncached {uncached} <= t {t:.0f}", moved
        moved = "local" if l_pd > l_prfaas else None
        return "prfaas", f"abundant: uncached {uncached} > t {t:.0f}", moved


def make_policy(name: str, threshold: float = 0.0, bandwidth_mode: str = "scarce") -> RoutingPolicy:
    if name == "homogeneous":
        return HomogeneousPolicy()
    if name == "naive":
        return NaivePolicy()
    if name == "prfaas":
        return PrfaasPolicy(threshold, bandwidth_mode)  # type: ignore[arg-type]
    raise ValueError(f"unknown policy {name!r}; expected homogeneous, naive or prfaas")
