"""gRPC plumbing shared by every service: channel and server options, channels, health and
reflection. Every channel and server is mutual TLS unless the process runs --insecure
(`prfaas.security`). `status` maps domain errors to status codes, `convert` maps records to messages,
`serve` is the one bootstrap every server starts through.

KV chunks and prompts can exceed gRPC's 4 MiB default, so both ends raise it; every server and
channel also takes large HTTP/2 frames and reads, which the KV stream's MiB messages need.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from prfaas.security.tls import TlsConfig
from prfaas.security.tls import current as current_tls

# the KV data plane's default max frame (64 MiB, prfaas/transport/limits.py) plus slack: a server
# never takes a larger message (gRPC allocates it before any handler sees it)
MAX_MESSAGE_BYTES = 65 * 1024 * 1024

OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 8 << 20),
)

# A restarted peer is found again within ~2 s. Not `grpc.min_reconnect_backoff_ms`: gRPC also takes
# it as the connection attempt's timeout, and a TLS handshake with a busy server can take longer
# than 200 ms (the attempt then fails UNAVAILABLE, "timed out before receiving SETTINGS frame").
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def channel_options(own_connection: int | None = None) -> list[tuple[str, int | str]]:
    """Options for a client channel. `own_connection=i` gives the channel a private TCP
    connection (distinct channel args and a local subchannel pool), so that N channels to the
    same address really are N connections."""
    opts: list[tuple[str, int | str]] = [*OPTIONS, *RECONNECT_OPTIONS]
    if own_connection is not None:
        opts += [("grpc.use_local_subchannel_pool", 1), ("prfaas.connection_index", own_connection)]
    return opts


def insecure_channel(address: str, own_connection: int | None = None) -> grpc.aio.Channel:
    """A plaintext channel: only for a peer started with --insecure (`channel` picks for you)."""
    return grpc.aio.insecure_channel(address, options=channel_options(own_connection))


def channel(address: str, expect: str = "", own_connection: int | None = None,
            tls: TlsConfig | None = None) -> grpc.aio.Channel:
    """A channel to `address` under the process's TLS configuration (`prfaas.security.tls.current()`,
    or `tls`): mutual TLS, the server's certificate verified against the cluster's CA and against
    the name `expect` (a node id, `router`, `cachepool`; empty: the host of `address`).
    Plaintext when the configuration is --insecure."""
    cfg = tls or current_tls()
    if cfg.insecure:
        return insecure_channel(address, own_connection)
    opts = channel_options(own_connection)
    if expect:
        opts.append(("grpc.ssl_target_name_override", expect))
    return grpc.aio.secure_channel(address, cfg.channel_credentials(), options=opts)


def new_server(interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    return grpc.aio.server(options=list(OPTIONS), interceptors=list(interceptors))


class Health:
    """The standard gRPC health service of one server, every name at once."""

    def __init__(self, server: grpc.aio.Server, service_names: Sequence[str], serving: bool = True) -> None:
        self.names = (*service_names, "")
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self.set(serving)

    def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.names:
            self.servicer.set(name, status)


def add_health_and_reflection(server: grpc.aio.Server, service_names: Sequence[str], serving: bool = True) -> Health:
    """Registers the standard health service (every name SERVING, or NOT_SERVING until `set`) and
    reflection."""
    h = Health(server, service_names, serving)
    reflection.enable_server_reflection((*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return h
