"""Service configuration, read in one place: command-line flags with PRFAAS_* environment
variables as their defaults. Every service's __main__ calls `parse_node_settings`."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


def _env(name: str, default: str = "") -> str:
    return os.environ.get(f"PRFAAS_{name}", default)


@dataclass(frozen=True)
class NodeSettings:
    node_id: str
    cluster: str  # "prfaas" or "local"
    role: str  # "prefill" or "decode"
    listen: str  # host:port to bind; port 0 picks a free one
    advertise: str  # host:port others dial; empty = the bound address
    cachepool: str  # host:port of the cache pool; empty = standalone
    model: str  # a directory or builtin:FAMILY-PRESET
    dtype: str
    block_size: int
    kv_blocks: int
    state_slots: int
    kv_connections: int
    max_batch: int
    transfer_timeout_s: float
    hardware: str
    metrics_port: int
    log_level: str
    convertible: bool = False  # serves prefill and decode; the router may switch its role
    prefill_chunk_tokens: int = 2048  # prefill nodes: chunk longer prompts (a power of two; 0 = never)
    kv_transport: str = "tcp"  # decode nodes: also take KV on a raw-TCP data port ("tcp") or gRPC only
    kv_tcp_port: int = 0  # that port (0 = any free port; fix it where firewalls need to know)
    device: str = "cpu"  # cpu, cuda or cuda:N
    attention_backend: str = "auto"  # on a GPU: flashinfer, flash_attn or torch


def add_node_flags(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("--node-id", default=_env("NODE_ID", f"{role}-0"))
    p.add_argument("--cluster", default=_env("CLUSTER", "local"), choices=["prfaas", "local"])
    p.add_argument("--listen", default=_env("LISTEN", "127.0.0.1:0"))
    p.add_argument("--advertise", default=_env("ADVERTISE", ""))
    p.add_argument("--cachepool", default=_env("CACHEPOOL", ""))
    p.add_argument("--model", default=_env("MODEL", "builtin:qwen3_next-tiny"))
    p.add_argument("--dtype", default=_env("DTYPE", "float32"), choices=["float32", "bfloat16"])
    p.add_argument("--block-size", type=int, default=int(_env("BLOCK_SIZE", "16")))
    p.add_argument("--kv-blocks", type=int, default=int(_env("KV_BLOCKS", "2048")))
    p.add_argument("--state-slots", type=int, default=int(_env("STATE_SLOTS", "64")))
    p.add_argument("--kv-connections", type=int, default=int(_env("KV_CONNECTIONS", "4")))
    p.add_argument("--max-batch", type=int, default=int(_env("MAX_BATCH", "32")))
    p.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=int(_env("PREFILL_CHUNK_TOKENS", "2048")),
        help="prefill longer prompts in chunks of this many tokens (a power of two), streaming as they go",
    )
    p.add_argument("--transfer-timeout-s", type=float, default=float(_env("TRANSFER_TIMEOUT_S", "30")))
    p.add_argument("--hardware", default=_env("HARDWARE", "cpu"))
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "0")))
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    p.add_argument(
        "--convertible",
        action="store_true",
        default=_env("CONVERTIBLE", "") in ("1", "true"),
        help="serve both prefill and decode, so the router can convert this node's role",
    )
    p.add_argument("--device", default=_env("DEVICE", "cpu"), help="cpu, cuda or cuda:N")
    p.add_argument(
        "--kv-transport",
        default=_env("KV_TRANSPORT", "tcp"),
        choices=["tcp", "grpc"],
        help="decode nodes: take KV on a raw-TCP data port beside gRPC PushKv (tcp), or PushKv only",
    )
    p.add_argument("--kv-tcp-port", type=int, default=int(_env("KV_TCP_PORT", "0")))
    p.add_argument(
        "--attention-backend",
        default=_env("ATTENTION_BACKEND", "auto"),
        choices=["auto", "torch", "flashinfer", "flash_attn"],
    )


def parse_node_settings(role: str, argv: list[str] | None = None) -> NodeSettings:
    p = argparse.ArgumentParser(prog=f"python -m services.{role}")
    add_node_flags(p, role)
    a = p.parse_args(argv)
    return NodeSettings(
        node_id=a.node_id,
        cluster=a.cluster,
        role=_env("ROLE", role) if role in ("prefill", "decode") else role,
        listen=a.listen,
        advertise=a.advertise,
        cachepool=a.cachepool,
        model=a.model,
        dtype=a.dtype,
        block_size=a.block_size,
        kv_blocks=a.kv_blocks,
        state_slots=a.state_slots,
        kv_connections=a.kv_connections,
        max_batch=a.max_batch,
        transfer_timeout_s=a.transfer_timeout_s,
        hardware=a.hardware,
        metrics_port=a.metrics_port,
        log_level=a.log_level,
        convertible=a.convertible,
        prefill_chunk_tokens=a.prefill_chunk_tokens,
        kv_transport=a.kv_transport,
        kv_tcp_port=a.kv_tcp_port,
        device=a.device,
        attention_backend=a.attention_backend,
    )


@dataclass(frozen=True)
class RouterSettings:
    listen: str
    cachepool: str
    model: str  # for the tokenizer and the KV layout (sizes)
    policy: str  # "prfaas", "homogeneous" or "naive"
    threshold_tokens: float
    bandwidth_mode: str  # "scarce" or "abundant"
    link_gbps: float  # configured PrfaaS -> local link capacity, for the controller
    kv_connections: int
    transfer_timeout_s: float
    refresh_s: float
    control_interval_s: float  # short-term controller period; 0 turns the control loop off
    role_interval_s: float  # long-term controller period
    metrics_port: int
    log_level: str


def parse_router_settings(argv: list[str] | None = None) -> RouterSettings:
    p = argparse.ArgumentParser(prog="python -m services.router")
    p.add_argument("--listen", default=_env("LISTEN", "127.0.0.1:0"))
    p.add_argument("--cachepool", default=_env("CACHEPOOL", ""), required=not _env("CACHEPOOL"))
    p.add_argument("--model", default=_env("MODEL", "builtin:qwen3_next-tiny"))
    p.add_argument("--policy", default=_env("POLICY", "prfaas"), choices=["prfaas", "homogeneous", "naive"])
    p.add_argument("--threshold-tokens", type=float, default=float(_env("THRESHOLD_TOKENS", "256")))
    p.add_argument("--bandwidth-mode", default=_env("BANDWIDTH_MODE", "scarce"), choices=["scarce", "abundant"])
    p.add_argument("--link-gbps", type=float, default=float(_env("LINK_GBPS", "10")))
    p.add_argument("--kv-connections", type=int, default=int(_env("KV_CONNECTIONS", "0")))
    p.add_argument("--transfer-timeout-s", type=float, default=float(_env("TRANSFER_TIMEOUT_S", "30")))
    p.add_argument("--refresh-s", type=float, default=float(_env("REFRESH_S", "0.5")))
    p.add_argument("--control-interval-s", type=float, default=float(_env("CONTROL_INTERVAL_S", "2")))
    p.add_argument("--role-interval-s", type=float, default=float(_env("ROLE_INTERVAL_S", "30")))
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "0")))
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    return RouterSettings(
        listen=a.listen,
        cachepool=a.cachepool,
        model=a.model,
        policy=a.policy,
        threshold_tokens=a.threshold_tokens,
        bandwidth_mode=a.bandwidth_mode,
        link_gbps=a.link_gbps,
        kv_connections=a.kv_connections,
        transfer_timeout_s=a.transfer_timeout_s,
        refresh_s=a.refresh_s,
        control_interval_s=a.control_interval_s,
        role_interval_s=a.role_interval_s,
        metrics_port=a.metrics_port,
        log_level=a.log_level,
    )
