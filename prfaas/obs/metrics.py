"""Prometheus metrics: one registry per process, and every metric the system exports, defined once
here so services just import and update them (`metrics.TTFT_SECONDS.labels(route="prfaas").observe(t)`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

REGISTRY = CollectorRegistry()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)

# --- requests ------------------------------------------------------------------------------------
TTFT_SECONDS = Histogram(
    "prfaas_ttft_seconds", "Time to first token, by prefill route.", ["route"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
TPOT_SECONDS = Histogram(
    "prfaas_time_per_output_token_seconds", "Time per output token after the first.",
    buckets=_TOKEN_BUCKETS, registry=REGISTRY,
)
QUEUE_TIME_SECONDS = Histogram(
    "prfaas_queue_time_seconds", "Time a request waited in the router's queue before it was placed.",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "prfaas_queue_depth", "Requests waiting, by node role.", ["role"], registry=REGISTRY,
)

# --- KV transfer ---------------------------------------------------------------------------------
KV_BYTES = Counter(
    "prfaas_kv_bytes", "KV cache bytes moved, by direction (sent or received).", ["direction"],
    registry=REGISTRY,
)
TRANSFER_SECONDS = Histogram(
    "prfaas_kv_transfer_seconds", "Duration of one request's KV transfer.",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
LINK_UTILISATION = Gauge(
    "prfaas_link_utilisation", "Measured egress utilisation of a link, 0 to 1.", ["link"], registry=REGISTRY,
)

# --- routing -------------------------------------------------------------------------------------
ROUTING_DECISIONS = Counter(
    "prfaas_routing_decisions", "Prefill routing decisions, by route.", ["route"], registry=REGISTRY,
)
PREFIX_HIT_TOKENS = Counter(
    "prfaas_prefix_hit_tokens", "Prompt tokens served from a prefix cache hit, by route.", ["route"],
    registry=REGISTRY,
)
PREFIX_QUERY_TOKENS = Counter(
    "prfaas_prefix_query_tokens", "Prompt tokens looked up in the prefix index.", registry=REGISTRY,
)
THRESHOLD_TOKENS = Gauge(
    "prfaas_threshold_tokens", "The routing threshold t on uncached prompt length.", registry=REGISTRY,
)

# --- cluster -------------------------------------------------------------------------------------
CLUSTER_NODES = Gauge(
    "prfaas_cluster_nodes", "Nodes registered with the cache pool.", ["cluster", "role"], registry=REGISTRY,
)
CACHE_EVENTS = Counter(
    "prfaas_cache_events", "Cache events applied by the cache pool, by kind.", ["kind"], registry=REGISTRY,
)


class MetricsServer:
    """The HTTP endpoint serving `REGISTRY` at /metrics, on its own thread."""

    def __init__(self, port: int, addr: str = "0.0.0.0") -> None:
        self._server, self._thread = start_http_server(port, addr=addr, registry=REGISTRY)
        self.port: int = self._server.server_address[1]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serves /metrics on `port` (0 picks a free one; read it back from `.port`)."""
    return MetricsServer(port, addr)
