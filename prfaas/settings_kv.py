"""The KV data plane's flags (prfaas/settings.py adds them to the node parser): the wire formats a
decode node takes and the limits against hostile peers (prfaas/transport/limits.py)."""

from __future__ import annotations

from typing import Any

from prfaas.validators import positive_float, positive_int


def wire_accept_list(text: str) -> str:
    """--kv-wire-accept (prfaas.transport.codec.wire_accept reads it; checked here without torch)."""
    bad = [w for w in (w.strip() for w in text.split(",")) if w and w not in ("int8", "fp8", "convert")]
    if bad:
        raise ValueError(f"unknown wire format {bad[0]!r}: use int8, fp8 and/or convert, comma-separated")
    return text


def kv_limit_flags(p: Any) -> None:
    mib = 1 << 20
    p.flag("--kv-max-frame-bytes", "KV_MAX_FRAME_BYTES", 64 * mib, positive_int,
           "the largest KV frame a peer may declare (raised to the layout's largest state)")
    p.flag("--kv-max-inflight-bytes", "KV_MAX_INFLIGHT_BYTES", 1024 * mib, positive_int,
           "KV frames being received at once on the node; more wait (must be >= the max frame)")
    p.flag("--kv-max-connections", "KV_MAX_CONNECTIONS", 1024, positive_int, "KV data-plane connections in total")
    p.flag("--kv-max-connections-per-peer", "KV_MAX_CONNECTIONS_PER_PEER", 256, positive_int,
           "KV data-plane connections per peer (source address)")
    p.flag("--kv-read-timeout-s", "KV_READ_TIMEOUT_S", 15.0, positive_float,
           "a KV frame that has started must be complete within this")
    p.flag("--kv-idle-timeout-s", "KV_IDLE_TIMEOUT_S", 10.0, positive_float,
           "close a KV connection that has carried no accepted chunk this long after connecting")
    p.flag("--kv-pooled-idle-timeout-s", "KV_POOLED_IDLE_TIMEOUT_S", 300.0, positive_float,
           "close a KV connection that has carried chunks after this long without a frame")
    p.flag("--kv-parallel-verify-bytes", "KV_PARALLEL_VERIFY_BYTES", mib, positive_int,
           "KV frames this large are checksummed in a worker thread, off the event loop")
    p.flag("--kv-pool-per-address", "KV_POOL_PER_ADDRESS", 16, positive_int,
           "prefill side: idle pooled KV connections kept per decode address")
    p.flag("--kv-pool-idle-s", "KV_POOL_IDLE_S", 120.0, positive_float,
           "prefill side: close a pooled KV connection idle this long (keep it below the decode side's pooled idle)")
