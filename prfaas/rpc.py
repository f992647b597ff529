"""gRPC plumbing shared by every service: message limits, server bootstrap, channels.

KV chunks and prompts can exceed gRPC's 4 MiB default, so both ends raise it.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

BASE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


def channel_options(own_connection: int | None = None) -> list[tuple[str, int | str]]:
    """Options for a client channel. `own_connection=i` gives the channel a private TCP
    connection (distinct channel args and a local subchannel pool), so that N channels to the
    same address really are N connections."""
    opts: list[tuple[str, int | str]] = list(BASE_OPTIONS)
    if own_connection is not None:
        opts += [("grpc.use_local_subchannel_pool", 1), ("prfaas.connection_index", own_connection)]
    return opts


def insecure_channel(address: str, own_connection: int | None = None) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=channel_options(own_connection))


def new_server(options: Sequence[tuple[str, int]] = ()) -> grpc.aio.Server:
    return grpc.aio.server(options=[*BASE_OPTIONS, *options])


def add_health_and_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> health.HealthServicer:
    """Registers the standard health service (every name SERVING) and reflection."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in (*service_names, ""):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return servicer
