"""Prometheus metrics: every family the system exports, defined once here with the roles that
export it and the vLLM name it corresponds to (docs/metrics.md is this table, explained).

A process installs the metrics of its roles once, at start (`metrics.install("router")`; a
convertible worker node `install("prefill", "decode")`); each role's code then updates
`metrics.current().FAMILY`. A process exports only its roles' families: asking for another
role's family is an AttributeError, so a mistake shows in the first test that takes the path.
In a process that installed nothing (tests wiring cores together) `current()` has every family.

Gauges of live state (requests running, KV blocks in use) are read at scrape time through
`bind(family, fn)`, so no event needs to remember to update them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import start_http_server

disable_created_metrics()  # no `_created` series beside every counter and histogram (vLLM has none)

ROLES = ("frontdoor", "router", "prefill", "decode", "cachepool")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)
TOKEN_COUNT_BUCKETS = (1, 8, 32, 128, 512, 2048, 8192, 32768, 131072)


@dataclass(frozen=True)
class Family:
    attr: str  # the attribute on `Metrics`
    name: str  # the Prometheus name (a counter's `_total` is added on exposition)
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    roles: tuple[str, ...]
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    vllm: str = ""  # the vLLM family it corresponds to ("" where vLLM has none)


F = Family
FAMILIES: tuple[Family, ...] = (
    # --- requests, as the client sees them (front door) and as the router serves them ----------------
    F("ttft", "prfaas_time_to_first_token_seconds", "histogram", "Time to first token, by prefill route.",
      ("frontdoor", "router"), ("route",), LATENCY_BUCKETS, "vllm:time_to_first_token_seconds"),
    F("itl", "prfaas_inter_token_latency_seconds", "histogram", "Time between two output tokens of a request.",
      ("frontdoor", "decode"), (), TOKEN_GAP_BUCKETS, "vllm:inter_token_latency_seconds"),
    F("e2e", "prfaas_e2e_request_latency_seconds", "histogram", "Request latency, arrival to last token.",
      ("frontdoor", "router"), (), LATENCY_BUCKETS, "vllm:e2e_request_latency_seconds"),
    F("queue_time", "prfaas_request_queue_time_seconds", "histogram",
      "Time a request waited before its prefill started (router: admission queue; prefill node: compute).",
      ("router", "prefill"), (), LATENCY_BUCKETS, "vllm:request_queue_time_seconds"),
    F("running", "prfaas_num_requests_running", "gauge",
      "Requests in progress (front door, router: in flight; prefill: computing or pushing; decode: in the batch).",
      ("frontdoor", "router", "prefill", "decode"), (), (), "vllm:num_requests_running"),
    F("waiting", "prfaas_num_requests_waiting", "gauge",
      "Requests waiting (router: admission queue; prefill: for the compute lock; decode: for their KV).",
      ("router", "prefill", "decode"), (), (), "vllm:num_requests_waiting"),
    F("prompt_tokens", "prfaas_prompt_tokens", "counter", "Prompt tokens of requests served.",
      ("frontdoor", "router"), (), (), "vllm:prompt_tokens_total"),
    F("generation_tokens", "prfaas_generation_tokens", "counter", "Tokens generated.",
      ("frontdoor", "router", "decode"), (), (), "vllm:generation_tokens_total"),
    F("request_success", "prfaas_request_success", "counter", "Requests finished, by finish reason.",
      ("frontdoor", "router"), ("finished_reason",), (), "vllm:request_success_total"),
    F("request_prompt_tokens", "prfaas_request_prompt_tokens", "histogram", "Prompt length of a request.",
      ("frontdoor",), (), TOKEN_COUNT_BUCKETS, "vllm:request_prompt_tokens"),
    F("request_generation_tokens", "prfaas_request_generation_tokens", "histogram", "Tokens a request generated.",
      ("frontdoor",), (), TOKEN_COUNT_BUCKETS, "vllm:request_generation_tokens"),
    F("http_requests", "prfaas_http_requests", "counter", "HTTP requests answered, by endpoint and status.",
      ("frontdoor",), ("endpoint", "status"), (), ""),
    # --- KV cache on a node -------------------------------------------------------------------------
    F("kv_usage", "prfaas_kv_cache_usage_perc", "gauge", "Fraction of the node's KV blocks in use (0 to 1).",
      ("prefill", "decode"), (), (), "vllm:kv_cache_usage_perc"),
    F("state_usage", "prfaas_state_slot_usage_perc", "gauge",
      "Fraction of the node's linear-state slots in use (0 to 1).", ("prefill", "decode"), (), (), ""),
    F("prefix_queries", "prfaas_prefix_cache_queries", "counter",
      "Prompt tokens looked up in a prefix cache (router: the cluster's index; prefill: the node's cache).",
      ("router", "prefill"), (), (), "vllm:prefix_cache_queries"),
    F("prefix_hits", "prfaas_prefix_cache_hits", "counter",
      "Prompt tokens served from a prefix cache hit, by route.", ("router", "prefill"), ("route",), (),
      "vllm:prefix_cache_hits"),
    F("decode_prefix_hits", "prfaas_decode_prefix_cache_hits", "counter",
      "Prompt tokens a decode node held in its own prefix cache (not transferred).", ("decode",), (), (), ""),
    F("prompt_computed", "prfaas_prompt_tokens_computed", "counter", "Prompt tokens a prefill node computed.",
      ("prefill",), (), (), ""),
    # --- the KV stream and the link -------------------------------------------------------------------
    F("kv_bytes", "prfaas_kv_transfer_bytes", "counter", "KV bytes pushed, by link (destination address).",
      ("prefill",), ("link",), (), ""),
    F("kv_transfer_seconds", "prfaas_kv_transfer_seconds", "histogram",
      "Duration of one request's KV transfer (first chunk sent to last ack), by link.",
      ("prefill",), ("link",), LATENCY_BUCKETS, ""),
    F("kv_received_bytes", "prfaas_kv_received_bytes", "counter", "KV bytes a decode node received.",
      ("decode",), (), (), ""),
    F("link_utilisation", "prfaas_link_utilisation", "gauge",
      "Egress of the PrfaaS cluster over the link's estimated capacity (0 to 1; 1 while transfers wait for it).",
      ("router",), ("link",), (), ""),
    F("link_capacity", "prfaas_link_capacity_bytes_per_second", "gauge",
      "The link's capacity as the control loop estimates it from completed transfers (the configured rate "
      "until transfers show less).", ("router",), ("link",), (), ""),
    # --- routing -------------------------------------------------------------------------------------
    F("threshold", "prfaas_threshold_tokens", "gauge", "The routing threshold t on uncached prompt length.",
      ("router",), (), (), ""),
    F("prefix_moves", "prfaas_prefix_moves", "counter",
      "Cross-cluster prefix decisions of the abundant-bandwidth rule: moved, recomputed, or failed.",
      ("router",), ("decision",), (), ""),
    F("prefix_move_bytes", "prfaas_prefix_move_bytes", "counter",
      "KV bytes of cached prefixes copied across clusters (counted by the router from the holder's report).",
      ("router",), (), (), ""),
    F("routing_decisions", "prfaas_routing_decisions", "counter", "Prefill routing decisions, by route.",
      ("router",), ("route",), (), ""),
    # --- the cluster -----------------------------------------------------------------------------------
    F("cluster_nodes", "prfaas_cluster_nodes", "gauge", "Nodes registered with the cache pool.",
      ("cachepool",), ("cluster", "role"), (), ""),
    F("cache_events", "prfaas_cache_events", "counter", "Cache events applied by the cache pool, by kind.",
      ("cachepool",), ("kind",), (), ""),
)
del F


def families_of(roles: Iterable[str]) -> list[Family]:
    wanted = set(roles)
    unknown = wanted - set(ROLES)
    if unknown:
        raise ValueError(f"unknown metric roles {sorted(unknown)}; known: {', '.join(ROLES)}")
    return [f for f in FAMILIES if wanted & set(f.roles)]


class Metrics:
    """The families of some roles, in their own registry."""

    def __init__(self, roles: Iterable[str]) -> None:
        self.roles = tuple(roles)
        self.registry = CollectorRegistry()
        self._families: dict[str, Any] = {}
        for f in families_of(self.roles):
            kw: dict[str, Any] = {"labelnames": f.labels, "registry": self.registry}
            if f.kind == "histogram":
                self._families[f.attr] = Histogram(f.name, f.help, buckets=f.buckets, **kw)
            else:
                self._families[f.attr] = (Counter if f.kind == "counter" else Gauge)(f.name, f.help, **kw)

    def __getattr__(self, attr: str) -> Any:
        try:
            return self.__dict__["_families"][attr]
        except KeyError:
            raise AttributeError(f"no metric {attr!r} for roles {self.roles}") from None

    def has(self, attr: str) -> bool:
        return attr in self._families

    def bind(self, attr: str, fn: Callable[[], float]) -> None:
        """A gauge read at scrape time (roles without it: nothing to do)."""
        if attr in self._families:
            self._families[attr].set_function(fn)


_current: Metrics | None = None


def install(*roles: str) -> Metrics:
    """The process's metrics: those of its roles, exported by `start_metrics_server`."""
    global _current
    _current = Metrics(roles)
    return _current


def current() -> Metrics:
    global _current
    if _current is None:
        _current = Metrics(ROLES)
    return _current


class MetricsServer:
    """The HTTP endpoint serving the process's registry at /metrics, on its own thread."""

    def __init__(self, port: int, addr: str = "0.0.0.0") -> None:
        self._server, self._thread = start_http_server(port, addr=addr, registry=current().registry)
        self.port: int = self._server.server_address[1]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serves /metrics on `port` (0 picks a free one; read it back from `.port`)."""
    return MetricsServer(port, addr)
