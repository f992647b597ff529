"""Service configuration, read in one place: command-line flags whose defaults come from PRFAAS_*
environment variables. Every service's __main__ calls one `parse_*_settings` here; `--help` shows
each flag's default and its variable, and a bad value (flag or variable) is one line on stderr
and exit status 2, never a traceback. Torch-free: the router and the cache pool parse here too.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prfaas.dtypes import CACHE_DTYPES
from prfaas.settings_kv import kv_limit_flags, wire_accept_list
from prfaas.validators import (
    boolean,
    host_port,
    is_loopback,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    power_of_two_or_zero,
    thread_count,
)

# the trained Qwen3-Next-style model shipped in the package (docs/models.md); tests use builtin:*-tiny
DEFAULT_MODEL = "builtin:qwen3_next-small"

__all__ = ["boolean", "host_port", "non_negative_float", "non_negative_int", "positive_float", "positive_int"]


class _Parser(argparse.ArgumentParser):
    """Flags with PRFAAS_* defaults: `flag("--kv-blocks", "KV_BLOCKS", 2048, positive_int, "...")`."""

    def __init__(self, prog: str, description: str) -> None:
        super().__init__(prog=prog, description=description,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def flag(self, name: str, env: str, default: Any, kind: Callable[[str], Any] = str, help: str = "",
             choices: Sequence[str] | None = None) -> None:
        var = f"PRFAAS_{env}"
        raw = os.environ.get(var)
        value = default
        if raw is not None:
            try:
                value = kind(raw)
            except ValueError as e:
                self.error(f"{var}={raw!r}: {_reason(e)}")
            if choices is not None and value not in choices:
                self.error(f"{var}={raw!r}: choose from {', '.join(choices)}")

        def typed(text: str) -> Any:
            try:
                return kind(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(_reason(e)) from None

        typed.__name__ = getattr(kind, "__name__", "value")
        self.add_argument(name, type=typed, default=value, choices=choices, help=f"{help} [env {var}]".strip())

    def switch(self, name: str, env: str, help: str) -> None:
        """A boolean flag; its variable takes 1/true/yes/on or 0/false/no/off."""
        var = f"PRFAAS_{env}"
        raw = os.environ.get(var)
        value = False
        if raw is not None:
            try:
                value = boolean(raw)
            except ValueError as e:
                self.error(f"{var}={raw!r}: {_reason(e)}")
        self.add_argument(name, action=argparse.BooleanOptionalAction, default=value, help=f"{help} [env {var}]")


def _reason(e: ValueError) -> str:
    text = str(e)
    return text if text.startswith("must") else f"not a valid value ({text})"


def _common(p: _Parser, listen: str) -> None:
    p.flag("--listen", "LISTEN", listen, host_port, "host:port to bind; port 0 picks a free one")
    p.flag("--metrics-port", "METRICS_PORT", 0, non_negative_int, "Prometheus /metrics port; 0 = none")
    p.flag("--log-level", "LOG_LEVEL", "INFO", str.upper, "log level",
           choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    _tls(p)


def _tls(p: _Parser) -> None:
    """Mutual TLS, on by default (prfaas/security/tls.py, docs/security.md)."""
    p.flag("--tls-dir", "TLS_DIR", "", str,
           "directory with ca.crt and this process's NAME.crt / NAME.key (prfaas certs makes them)")
    p.flag("--ca", "CA", "", str, "the cluster CA certificate (PEM); default: TLS_DIR/ca.crt")
    p.flag("--cert", "CERT", "", str, "this process's certificate (PEM); default: TLS_DIR/NAME.crt")
    p.flag("--key", "KEY", "", str, "this process's private key (PEM); default: TLS_DIR/NAME.key")
    p.switch("--insecure", "INSECURE", "turn TLS off (no identities are checked); refused on a non-loopback "
             "listen address without --allow-insecure-remote")
    p.switch("--allow-insecure-remote", "ALLOW_INSECURE_REMOTE",
             "with --insecure: allow a non-loopback listen address anyway")


@dataclass(frozen=True, kw_only=True)
class TlsFlags:
    """The TLS flags every service shares (mixed into each settings class)."""

    tls_dir: str = ""
    ca: str = ""
    cert: str = ""
    key: str = ""
    insecure: bool = False
    allow_insecure_remote: bool = False


# --- worker nodes (prefill, decode, convertible) ---------------------------------------------------
@dataclass(frozen=True)
class NodeSettings(TlsFlags):
    node_id: str
    cluster: str  # "prfaas" or "local"
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
    max_request_blocks: int = 0  # decode nodes: the most blocks one request may hold; 0 = half the pool
    drain_timeout_s: float = 30.0  # on SIGTERM: how long requests in flight may take to finish
    kv_wire_accept: str = "int8,fp8,convert"  # decode nodes: KV wire formats taken (transport/codec.py)
    emulate: str = ""  # an emulated accelerator profile (JSON, prfaas.eval.emulate); empty = real time
    # KV data-plane limits against hostile peers (prfaas/transport/limits.py, docs/transport.md "Limits")
    kv_max_frame_bytes: int = 64 << 20  # the largest frame (raised to the layout's largest state)
    kv_max_inflight_bytes: int = 1 << 30  # frames being received at once, all connections
    kv_max_connections: int = 1024  # data-plane connections in total
    kv_max_connections_per_peer: int = 256  # per peer (source address)
    kv_read_timeout_s: float = 15.0  # a frame that has started must be complete within this
    kv_idle_timeout_s: float = 10.0  # a connection that never carried an accepted chunk
    kv_pooled_idle_timeout_s: float = 300.0  # a connection that did (a sender's pooled one)
    kv_parallel_verify_bytes: int = 1 << 20  # frames this large are checksummed off the event loop
    kv_pool_per_address: int = 16  # prefill side: idle pooled connections per decode address
    kv_pool_idle_s: float = 120.0  # prefill side: a pooled connection idle this long is closed
    prefix_cache: str = "full"  # "off", "prefill" (prefill nodes only) or "full" (decode nodes too)
    checkpoint_tokens: int = 256  # a linear-state checkpoint every this many tokens (a block multiple)
    prefix_states: int = 0  # state slots the prefix cache may hold; 0 = half the slots
    push_after_tokens: int = 512  # local-cluster prefill nodes: shorter prompts push their KV after the sample
    threads: int = 0  # torch's intra-op threads; 0 = torch's default (every core)


def parse_node_settings(role: str, argv: list[str] | None = None) -> NodeSettings:
    """`role` is the process's ("prefill" or "decode"); PRFAAS_ROLE, where set, must agree."""
    p = _Parser(f"python -m services.{role}", f"A PrfaaS {role} node.")
    p.flag("--node-id", "NODE_ID", f"{role}-0", str, "this node's id in the cluster")
    p.flag("--cluster", "CLUSTER", "local", str, "the cluster it belongs to", choices=["prfaas", "local"])
    _common(p, "127.0.0.1:0")
    p.flag("--advertise", "ADVERTISE", "", str, "host:port others dial; empty = the bound address")
    p.flag("--cachepool", "CACHEPOOL", "", str, "host:port of the cache pool; empty = standalone")
    p.flag("--model", "MODEL", DEFAULT_MODEL, str, "a model directory or builtin:FAMILY-PRESET")
    p.flag("--dtype", "DTYPE", "float32", str, "model and KV cache dtype", choices=list(CACHE_DTYPES))
    p.flag("--block-size", "BLOCK_SIZE", 16, positive_int, "tokens per KV block")
    p.flag("--kv-blocks", "KV_BLOCKS", 2048, positive_int, "KV blocks in the pool")
    p.flag("--state-slots", "STATE_SLOTS", 64, positive_int, "linear-state slots in the pool")
    p.flag("--kv-connections", "KV_CONNECTIONS", 4, positive_int, "TCP connections per KV transfer")
    p.flag("--max-batch", "MAX_BATCH", 32, positive_int, "decode batch size")
    p.flag("--prefill-chunk-tokens", "PREFILL_CHUNK_TOKENS", 2048, power_of_two_or_zero,
           "prefill longer prompts in chunks of this many tokens (a power of two; 0 = never), streaming as they go")
    p.flag("--transfer-timeout-s", "TRANSFER_TIMEOUT_S", 30.0, positive_float, "KV transfer deadline")
    p.flag("--hardware", "HARDWARE", "cpu", str, "accelerator profile name reported to the cluster")
    p.switch("--convertible", "CONVERTIBLE", "serve both prefill and decode, so the router can convert this node")
    p.flag("--device", "DEVICE", "cpu", str, "cpu, cuda or cuda:N")
    p.flag("--kv-transport", "KV_TRANSPORT", "tcp", str,
           "decode nodes: take KV on a raw-TCP data port beside gRPC PushKv (tcp), or PushKv only",
           choices=["tcp", "grpc"])
    p.flag("--kv-tcp-port", "KV_TCP_PORT", 0, non_negative_int, "the raw-TCP KV data port; 0 = any free one")
    p.flag("--attention-backend", "ATTENTION_BACKEND", "auto", str, "full-attention kernels on a GPU",
           choices=["auto", "torch", "flashinfer", "flash_attn"])
    p.flag("--max-request-blocks", "MAX_REQUEST_BLOCKS", 0, non_negative_int,
           "decode nodes: the most KV blocks one request (prompt + output) may hold; 0 = half the pool")
    p.flag("--drain-timeout-s", "DRAIN_TIMEOUT_S", 30.0, non_negative_float,
           "on SIGTERM: how long the requests in flight may take to finish")
    p.flag("--kv-wire-accept", "KV_WIRE_ACCEPT", "int8,fp8,convert", wire_accept_list,
           "decode nodes: KV wire formats taken, comma-separated: int8, fp8 (compressed), convert (KV "
           "from a node of another cache dtype); empty = exact in its own dtype only")
    kv_limit_flags(p)
    p.flag("--emulate", "EMULATE", "", str,
           "an emulated accelerator profile (JSON; docs/evaluation.md): compute for real, hold results until "
           "the profile's time; empty = real time")
    p.flag("--prefix-cache", "PREFIX_CACHE", "full", str,
           "which nodes keep a prefix cache: none, prefill nodes, or prefill and decode nodes",
           choices=["off", "prefill", "full"])
    p.flag("--checkpoint-tokens", "CHECKPOINT_TOKENS", 256, positive_int,
           "prefill nodes: keep a linear-state checkpoint every this many prompt tokens (a multiple of the "
           "block size; the last block boundary before a prompt's end always has one)")
    p.flag("--prefix-states", "PREFIX_STATES", 0, non_negative_int,
           "linear-state checkpoints the prefix cache may hold (each one state slot); 0 = half the slots")
    p.flag("--threads", "THREADS", 0, thread_count, "torch intra-op threads of this node; 0 = torch's default "
           "(every core). Nodes sharing a machine should split its cores (prfaas up does)")
    p.flag("--push-after-tokens", "PUSH_AFTER_TOKENS", 512, non_negative_int, "local-cluster prefill nodes: a prompt "
           "computing fewer tokens pushes its KV once its first token is sampled, not layer by layer; 0 = never")
    env_role = os.environ.get("PRFAAS_ROLE")
    if env_role not in (None, "", role):
        p.error(f"PRFAAS_ROLE={env_role!r} but this is a {role} node (python -m services.{role})")
    a = p.parse_args(argv)
    if a.kv_max_inflight_bytes < a.kv_max_frame_bytes:
        p.error("--kv-max-inflight-bytes must be >= --kv-max-frame-bytes")
    return NodeSettings(**{f: getattr(a, f) for f in NodeSettings.__dataclass_fields__})


# --- router ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RouterSettings(TlsFlags):
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
    stall_timeout_s: float = 5.0
    prefill_inflight: int = 4
    max_queue: int = 1024
    max_queue_tokens: int = 1 << 22
    max_head_wait_s: float = 5.0
    max_queue_wait_s: float = 120.0
    stale_after_s: float = 10.0
    drain_timeout_s: float = 30.0
    kv_compression: str = "auto"  # off / auto / always: compress cross-cluster KV (services/router/wire.py)
    kv_compression_format: str = "int8"  # the compressed form: int8 or fp8
    token_listen: str = ""  # a second port, server-only TLS, for clients with a bearer token
    client_tokens: str = ""  # the token file; empty = certificates only
    max_client_requests: int = 64  # per client identity at once; 0 = no limit
    first_token: str = "prefill"  # the client's first token from the prefill node (before the KV drains) or decode


def parse_router_settings(argv: list[str] | None = None) -> RouterSettings:
    p = _Parser("python -m services.router", "The PrfaaS router: the client-facing API.")
    _common(p, "127.0.0.1:0")
    p.flag("--cachepool", "CACHEPOOL", "", str, "host:port of the cache pool (required)")
    p.flag("--model", "MODEL", DEFAULT_MODEL, str, "the model (tokenizer and KV sizes)")
    p.flag("--policy", "POLICY", "prfaas", str, "routing policy", choices=["prfaas", "homogeneous", "naive"])
    p.flag("--threshold-tokens", "THRESHOLD_TOKENS", 256.0, non_negative_float,
           "offload prefills whose uncached length exceeds this")
    p.flag("--bandwidth-mode", "BANDWIDTH_MODE", "scarce", str, "the paper's prefix rule",
           choices=["scarce", "abundant"])
    p.flag("--link-gbps", "LINK_GBPS", 10.0, positive_float, "PrfaaS -> local link capacity for the controller")
    p.flag("--kv-connections", "KV_CONNECTIONS", 0, non_negative_int, "connections per KV transfer; 0 = node default")
    p.flag("--transfer-timeout-s", "TRANSFER_TIMEOUT_S", 30.0, positive_float, "KV transfer deadline")
    p.flag("--refresh-s", "REFRESH_S", 0.5, non_negative_float, "membership refresh period")
    p.flag("--control-interval-s", "CONTROL_INTERVAL_S", 2.0, non_negative_float,
           "short-term controller period; 0 turns the control loop off")
    p.flag("--role-interval-s", "ROLE_INTERVAL_S", 30.0, positive_float, "long-term controller period")
    p.flag("--stall-timeout-s", "STALL_TIMEOUT_S", 5.0, positive_float,
           "a node stream (prefill progress, decode tokens or keepalives) quiet this long has stalled")
    p.flag("--prefill-inflight", "PREFILL_INFLIGHT", 4, positive_int,
           "requests a prefill node holds at once; the rest wait in the router")
    p.flag("--max-queue", "MAX_QUEUE", 1024, positive_int, "requests that may wait; past it RESOURCE_EXHAUSTED")
    p.flag("--max-queue-tokens", "MAX_QUEUE_TOKENS", 1 << 22, positive_int, "prompt tokens that may wait")
    p.flag("--max-head-wait-s", "MAX_HEAD_WAIT_S", 5.0, non_negative_float,
           "how long the oldest waiting request lets younger ones that fit go first")
    p.flag("--max-queue-wait-s", "MAX_QUEUE_WAIT_S", 120.0, positive_float,
           "a request no node could take for this long fails UNAVAILABLE")
    p.flag("--stale-after-s", "STALE_AFTER_S", 10.0, positive_float,
           "a node whose last heartbeat is older is out of routing")
    p.flag("--drain-timeout-s", "DRAIN_TIMEOUT_S", 30.0, non_negative_float,
           "on SIGTERM: how long the requests in flight may take to finish")
    p.flag("--kv-compression", "KV_COMPRESSION", "auto", str,
           "compress cross-cluster KV transfers: never, while the link is the bottleneck (measured egress "
           "near --link-gbps, retransmits), or always", choices=["off", "auto", "always"])
    p.flag("--kv-compression-format", "KV_COMPRESSION_FORMAT", "int8", str,
           "the compressed wire format (docs/compression.md)", choices=["int8", "fp8"])
    p.flag("--token-listen", "TOKEN_LISTEN", "", host_port_or_empty,
           "host:port of a second gRPC port, server-only TLS, for clients with a bearer token; empty = none")
    p.flag("--client-tokens", "CLIENT_TOKENS", "", str,
           "file of client bearer tokens (one a line, optionally name:token), re-read when it changes")
    p.flag("--max-client-requests", "MAX_CLIENT_REQUESTS", 64, non_negative_int,
           "requests one client identity may hold at once (RESOURCE_EXHAUSTED past it); 0 = no limit")
    p.flag("--first-token", "FIRST_TOKEN", "prefill", str, "where the client's first token comes from: the prefill "
           "node as it samples it, or the decode node once the KV has landed", choices=["prefill", "decode"])
    a = p.parse_args(argv)
    if not a.cachepool:
        p.error("--cachepool (or PRFAAS_CACHEPOOL) is required")
    if a.token_listen and not a.client_tokens:
        p.error("--token-listen needs --client-tokens (the tokens it accepts)")
    return RouterSettings(**{f: getattr(a, f) for f in RouterSettings.__dataclass_fields__})


# --- cache pool ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachePoolSettings(TlsFlags):
    listen: str = "127.0.0.1:50050"
    block_size: int = 16
    heartbeat_timeout_s: float = 10.0
    heartbeat_interval_s: float | None = None  # None: a third of the timeout
    metrics_port: int = 0
    log_level: str = "INFO"


def parse_cachepool_settings(argv: list[str] | None = None) -> CachePoolSettings:
    p = _Parser("python -m services.cachepool", "The PrfaaS cache pool: membership and the prefix index.")
    _common(p, "127.0.0.1:50050")
    p.flag("--block-size", "BLOCK_SIZE", 16, positive_int, "tokens per prefix block (as the nodes')")
    p.flag("--heartbeat-timeout-s", "HEARTBEAT_TIMEOUT_S", 10.0, positive_float,
           "drop a node that has not heartbeated for this long")
    p.flag("--heartbeat-interval-s", "HEARTBEAT_INTERVAL_S", 0.0, non_negative_float,
           "the interval nodes are told to heartbeat at; 0 = a third of the timeout")
    a = p.parse_args(argv)
    a.heartbeat_interval_s = a.heartbeat_interval_s or None
    return CachePoolSettings(**{f: getattr(a, f) for f in CachePoolSettings.__dataclass_fields__})


# --- front door (the OpenAI-compatible HTTP API) -----------------------------------------------------
@dataclass(frozen=True)
class FrontDoorSettings(TlsFlags):
    listen: str  # host:port of the HTTP server; port 0 picks a free one
    router: str  # host:port of the router's gRPC API
    model: str  # the model directory (tokenizer, chat template, generation defaults)
    served_model_name: str  # the `model` clients name; empty = the model directory's name
    api_key: str  # clients must send `Authorization: Bearer KEY`; empty = no check
    max_n: int = 8
    default_max_tokens: int = 256
    log_level: str = "INFO"
    api_keys_file: str = ""  # one key a line, optionally name:key, re-read when it changes
    max_client_requests: int = 64  # per API key at once; 429 past it; 0 = no limit
    https_cert: str = ""  # serve HTTPS with this certificate chain (PEM) and https_key
    https_key: str = ""
    allow_plain_http: bool = False  # plain HTTP on a non-loopback address (a TLS proxy in front)


def parse_frontdoor_settings(argv: list[str] | None = None) -> FrontDoorSettings:
    p = _Parser("python -m services.frontdoor", "The PrfaaS front door: an OpenAI-compatible HTTP API.")
    p.flag("--listen", "LISTEN", "127.0.0.1:8000", host_port, "host:port of the HTTP server; port 0 picks a free one")
    p.flag("--router", "ROUTER", "", host_port_or_empty, "host:port of the router's gRPC API (required)")
    p.flag("--model", "MODEL", DEFAULT_MODEL, str, "the model (tokenizer, chat template, defaults)")
    p.flag("--served-model-name", "SERVED_MODEL_NAME", "", str,
           "the model name clients send; empty = the model directory's name")
    p.flag("--api-key", "API_KEY", "", _Secret, "require `Authorization: Bearer KEY`; empty = no check")
    p.flag("--max-n", "MAX_N", 8, positive_int, "the largest n (choices per request) accepted")
    p.flag("--default-max-tokens", "DEFAULT_MAX_TOKENS", 256, positive_int,
           "max_tokens when neither the request nor generation_config.json sets it")
    p.flag("--log-level", "LOG_LEVEL", "INFO", str.upper, "log level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.flag("--api-keys-file", "API_KEYS_FILE", "", str,
           "file of API keys (one a line, optionally name:key), re-read when it changes; with --api-key: both")
    p.flag("--max-client-requests", "MAX_CLIENT_REQUESTS", 64, non_negative_int,
           "requests one API key may hold at once (HTTP 429 past it); 0 = no limit")
    p.flag("--https-cert", "HTTPS_CERT", "", str, "serve HTTPS with this certificate chain (PEM), with --https-key")
    p.flag("--https-key", "HTTPS_KEY", "", str, "the private key (PEM) of --https-cert")
    p.switch("--allow-plain-http", "ALLOW_PLAIN_HTTP", "serve plain HTTP on a non-loopback address (prompts and "
             "API keys in clear: only behind a proxy that terminates TLS)")
    _tls(p)  # the front door's own certificate, for the router
    a = p.parse_args(argv)
    if not a.router:
        p.error("--router (or PRFAAS_ROUTER) is required")
    if bool(a.https_cert) != bool(a.https_key):
        p.error("--https-cert and --https-key go together")
    if not a.https_cert and not a.allow_plain_http and not is_loopback(a.listen.rsplit(":", 1)[0].strip("[]")):
        p.error(f"--listen {a.listen} is not a loopback address: plain HTTP there carries prompts and API keys in "
                "clear; give --https-cert and --https-key, or --allow-plain-http behind a proxy that terminates TLS")
    a.api_key = str.__str__(a.api_key)  # a plain string from here on
    return FrontDoorSettings(**{f: getattr(a, f) for f in FrontDoorSettings.__dataclass_fields__})


def host_port_or_empty(text: str) -> str:
    return text and host_port(text)


class _Secret(str):
    """A value `--help` shows as *** (an API key set through the environment stays out of it)."""

    def __new__(cls, value: str) -> _Secret:
        return super().__new__(cls, str.__str__(value))  # argparse converts its default again

    def __str__(self) -> str:
        return "***" if self else ""

    __repr__ = __str__


def tls_flags(p: _Parser) -> None:
    """The TLS flags, for a `prfaas` subcommand that calls a cluster (demo, status)."""
    _tls(p)


def tool_tls(a: Any, p: _Parser, name: str) -> None:
    """Installs the TLS configuration of a `prfaas` subcommand from its parsed `tls_flags`, as the
    identity `name` (`client` or `admin`); a bad configuration is a usage error."""
    from prfaas.security import tls

    try:
        tls.install(tls.resolve(tls_dir=a.tls_dir, ca=a.ca, cert=a.cert, key=a.key, insecure=a.insecure,
                                name=name, kind=name))
    except ValueError as e:
        p.error(str(e))


def command_parser(prog: str, description: str | None = None) -> _Parser:
    """The parser of a `prfaas` subcommand: like the services', every flag's `--help` shows its
    default (and its PRFAAS_* variable, for flags added with `.flag`)."""
    return _Parser(prog, description or "")
